"""On-disk layout of a checkpoint directory, its completion marker and its checksums.

    checkpoints/
      step_0000100/            a complete checkpoint: DONE is present
        __0_0.distcp ...       DCP tensor data, one file per rank that wrote
        .metadata              DCP's index of the tensors (read through safe_reader, never plain pickle)
        meta.json              everything that is not a tensor (written by rank 0)
        DONE                   JSON manifest, written last: step, val loss, size and CRC32 of every file
      .tmp_step_0000200/       being written (or left by a crash): ignored, cleaned by rank 0
      .trash_step_0000050/     being deleted by retention: ignored, cleaned by rank 0

A checkpoint counts only once DONE exists, and DONE is written after the directory got its final
name, so a crash at any moment leaves either a complete checkpoint or one that is ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

DONE = "DONE"
META = "meta.json"
METADATA = ".metadata"
SUMS_SUFFIX = ".crc32.json"  # per data file, written by the rank that wrote it, merged into DONE
FORMAT = 2       # of DONE: 2 has "crc32", of its own content; 1 (without) is still read
META_FORMAT = 1  # of meta.json ("meta_format"; checkpoints written before it was recorded are format 1)
STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 16 << 20


# The option through which the command that hit a checkpoint error takes its checkpoint, so the error's
# way out fits that command: the trainer's --resume by default; `checkpoint_option` sets another (or
# none: "use another checkpoint") around a load, e.g. evaluate's and sample's --checkpoint.
_OPTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("checkpoint_option", default="--resume")


@contextlib.contextmanager
def checkpoint_option(option: str | None):
    token = _OPTION.set(option)
    try:
        yield
    finally:
        _OPTION.reset(token)


def other_checkpoint(which: str = "another") -> str:
    """The way out of a checkpoint error, in the words of the command that hit it."""
    option = _OPTION.get()
    return f"pass {option} with {which} checkpoint" if option else f"use {which} checkpoint"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def tmp_dir_name(step: int) -> str:
    return f".tmp_{step_dir_name(step)}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    val_loss: float | None = None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every `step_*` directory under root, oldest first; `complete` says whether DONE is present."""
    out = []
    try:
        entries = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file: no checkpoints
        return []
    for entry in entries:
        m = STEP_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        done = entry / DONE
        if not done.is_file():
            out.append(CheckpointInfo(entry, int(m.group(1)), False))
            continue
        try:
            val = json.loads(done.read_text()).get("val_loss")
        except (OSError, ValueError, AttributeError):
            val = None  # an unreadable DONE: load() names it; listing must not fail on it
        val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else None
        out.append(CheckpointInfo(entry, int(m.group(1)), True, val))
    return sorted(out, key=lambda c: c.step)


def crc32_file(path: Path, offset: int = 0, length: int | None = None) -> int:
    """CRC32 of a file or of one slice of it, read in 16 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = length if length is not None else -1
        while left != 0:
            buf = f.read(_CHUNK if left < 0 else min(_CHUNK, left))
            if not buf:
                break
            crc = zlib.crc32(buf, crc)
            left = left - len(buf) if left > 0 else left
    return crc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durably(path: Path, obj) -> None:
    """Write JSON to `path` through a temporary name, fsync'd, so a reader sees all of it or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_manifest(directory: Path, step: int, val_loss: float | None, world_size: int) -> dict:
    """DONE's content: the checksums each writer left beside its data file, plus .metadata and meta.json.

    Data files carry one CRC32 per tensor (keyed by byte offset) so a loader verifies exactly the
    bytes it reads; the small files get one CRC32 each.
    """
    files: dict[str, dict] = {}
    for sums in sorted(directory.glob("*" + SUMS_SUFFIX)):
        data_name = sums.name[: -len(SUMS_SUFFIX)]
        items = json.loads(sums.read_text())
        files[data_name] = {"size": (directory / data_name).stat().st_size, "items": items}
    for name in (METADATA, META):
        p = directory / name
        files[name] = {"size": p.stat().st_size, "crc32": crc32_file(p)}
    val = val_loss if val_loss is not None and math.isfinite(val_loss) else None
    return {"format": FORMAT, "step": step, "val_loss": val, "world_size": world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}


def done_crc32(done: dict) -> int:
    """CRC32 of DONE's canonical JSON (sorted keys, no spaces) without its "crc32" key."""
    body = {k: v for k, v in done.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_done(directory: Path, done: dict) -> None:
    """Write DONE (the commit marker) with the CRC32 of its own content, durably."""
    write_json_durably(Path(directory) / DONE, {**done, "crc32": done_crc32(done)})


def read_manifest(path: Path) -> dict:
    """DONE of a checkpoint, or a CheckpointError that says what is wrong and what to do."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: {other_checkpoint('an existing')} "
                              "(runs/NAME/checkpoints/step_...) or a run directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory: pass a checkpoint directory "
                              "(runs/NAME/checkpoints/step_...), a run directory or, where accepted, a .safetensors file")
    done = path / DONE
    if not done.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {DONE}): delete it or {other_checkpoint()}")
    try:
        manifest = json.loads(done.read_text())
        if manifest.get("format") not in (1, FORMAT) or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a dist_gpt manifest")
        if (manifest["format"] >= 2 or "crc32" in manifest) and manifest.get("crc32") != done_crc32(manifest):
            raise ValueError("its CRC32 does not match its content")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{done} is corrupt ({e}): delete checkpoint {path} or {other_checkpoint()}") from None
    return manifest


def check_small_file(path: Path, manifest: dict, name: str) -> bytes:
    """Read .metadata or meta.json whole and verify its size and CRC32 against DONE."""
    p = Path(path) / name
    expect = manifest["files"].get(name)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing: checkpoint {path} is damaged; delete it or {other_checkpoint()}") from None
    if not isinstance(expect, dict) or len(raw) != expect.get("size") or zlib.crc32(raw) != expect.get("crc32"):
        raise CheckpointError(f"{p} is corrupt or truncated (its size or CRC32 differs from {DONE}): "
                              f"delete checkpoint {path} or {other_checkpoint()}")
    return raw


def read_meta(path: Path, manifest: dict | None = None) -> dict:
    """meta.json of a complete checkpoint, verified against DONE."""
    manifest = manifest if manifest is not None else read_manifest(path)
    raw = check_small_file(path, manifest, META)
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / META} is not valid JSON ({e}): delete checkpoint {path} or "
                              f"{other_checkpoint()}") from None
    if meta.get("meta_format", 1) != META_FORMAT:
        raise CheckpointError(f"{Path(path) / META} has meta format {meta.get('meta_format')!r}; this dist_gpt reads "
                              f"format {META_FORMAT}: it was written by another dist_gpt version; use that version")
    return meta


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that it never looks complete while half deleted: rename, then remove."""
    trash = path.with_name(f".trash_{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partials(root: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove what crashes left: .tmp_*/.trash_* directories and step_* directories without DONE."""
    removed = []
    try:
        entries = list(Path(root).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.is_dir() or entry in keep:
            continue
        partial = entry.name.startswith((".tmp_step_", ".trash_step_"))
        if partial or (STEP_RE.match(entry.name) and not (entry / DONE).exists()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
