"""Reading a DCP checkpoint without running anything it contains.

PyTorch's own `FileSystemReader` unpickles `.metadata` with plain `pickle` (any global, so any code)
and hands non-tensor entries to `torch.load(weights_only=False)`. Here:
- `.metadata` goes through `RestrictedUnpickler`, which admits only what DCP's metadata is made of:
  its metadata dataclasses, `torch.Size`, dtypes, layouts, memory-format encodings, paths and plain
  containers. Any other global (`os.system`, `builtins.eval`, ...) is refused before it is looked
  up, so it is never called.
- the metadata must describe tensors only: a non-tensor (bytes) entry is refused, because dist_gpt
  writes everything that is not a tensor to meta.json.
- every tensor is read with `torch.load(weights_only=True)` after its bytes were checked against
  the CRC32 recorded in DONE, and byte entries are refused again at read time.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import contextvars
import io
import pathlib
import pickle
import zlib
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ..errors import CheckpointError
from .layout import METADATA, check_small_file, other_checkpoint

_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_LAYOUTS = {n: v for n, v in vars(torch).items() if isinstance(v, torch.layout)}
_LAYOUTS_BY_STR = {str(v): v for v in _LAYOUTS.values()}
_MEMORY_FORMATS = {n: v for n, v in vars(torch).items() if isinstance(v, torch.memory_format)}


def _layout_by_name(name: str) -> torch.layout:
    """Stands in for torch.serialization._get_layout, which DCP's pickles name: a table lookup only."""
    if not isinstance(name, str) or name not in _LAYOUTS_BY_STR:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return _LAYOUTS_BY_STR[name]


_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
_ALLOWED = {("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n) for n in _METADATA_CLASSES}
_ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
_ALLOWED[("torch", "Size")] = torch.Size
_ALLOWED[("torch.serialization", "_get_layout")] = _layout_by_name
_ALLOWED.update({("torch", n): v for n, v in {**_DTYPES, **_LAYOUTS, **_MEMORY_FORMATS}.items()})
_ALLOWED.update({("pathlib", n): getattr(pathlib, n)
                 for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")})
_ALLOWED.update({("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "list", "dict", "tuple")})
_ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict


class UnsafeGlobalError(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals DCP's metadata is made of."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeGlobalError(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def unpickle_metadata(raw: bytes, where: Path) -> Metadata:
    """Unpickle `.metadata` bytes with the restricted unpickler; CheckpointError naming `where` otherwise."""
    try:
        md = RestrictedUnpickler(io.BytesIO(raw)).load()
    except UnsafeGlobalError as e:
        raise CheckpointError(f"{where} refers to {e.qualname}, which a checkpoint's metadata never holds: "
                              "refusing to load it (it was altered or not written by dist_gpt); use another checkpoint") from None
    except Exception as e:  # truncated or garbled bytes: EOFError, UnpicklingError, ValueError, ...
        raise CheckpointError(f"{where} is corrupt ({type(e).__name__}: {e}): delete that checkpoint or "
                              f"{other_checkpoint()}") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{where} holds a {type(md).__name__}, not DCP metadata: use another checkpoint")
    return md


def validate_metadata(md: Metadata, path: Path, manifest: dict | None) -> None:
    """Tensors only, every storage record well formed and inside a file of the checkpoint."""
    where = Path(path) / METADATA
    entries = md.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where} is corrupt (no entry table): use another checkpoint")
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(f"{where} lists a non-tensor entry {key!r}: dist_gpt checkpoints hold only tensors "
                                  "(everything else is in meta.json), and loading it would unpickle it; refusing. "
                                  "Use a checkpoint written by dist_gpt")
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.size, torch.Size):
            raise CheckpointError(f"{where} is corrupt (entry {key!r} is a {type(entry).__name__}): use another checkpoint")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{where} is corrupt (no storage table): use another checkpoint")
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, dcp_filesystem._StorageInfo):
            raise CheckpointError(f"{where} is corrupt (storage record {index!r}): use another checkpoint")
        name = info.relative_path
        if (not isinstance(name, str) or Path(name).name != name or name.startswith(".")
                or not isinstance(info.offset, int) or not isinstance(info.length, int)
                or info.offset < 0 or info.length < 0 or index.fqn not in entries):
            raise CheckpointError(f"{where} is corrupt (storage record of {index.fqn!r}): use another checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: {index.fqn!r} was written with a storage transform "
                                  f"{info.transform_descriptors} that dist_gpt does not read: use another checkpoint")
        if name not in sizes:
            sizes[name] = _checked_size(Path(path), name, manifest)
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(f"{Path(path) / name} is truncated: {index.fqn!r} ends at byte "
                                  f"{info.offset + info.length}, the file has {sizes[name]}; delete checkpoint "
                                  f"{path} or {other_checkpoint()}")


def _checked_size(path: Path, name: str, manifest: dict | None) -> int:
    file = path / name
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: checkpoint {path} is damaged; delete it or "
                              f"{other_checkpoint()}") from None
    if manifest is not None:
        expect = manifest["files"].get(name, {}).get("size")
        if expect != size:
            raise CheckpointError(f"{file} is {size} bytes but DONE records {expect}: the file is truncated or "
                                  f"was replaced; delete checkpoint {path} or {other_checkpoint()}")
    return size


def read_metadata(path: str | Path, manifest: dict | None = None) -> Metadata:
    """The `.metadata` of a checkpoint directory, safely unpickled and validated.

    With a manifest (DONE) its size and CRC32 are verified first; without one (a bare DCP
    directory) only the restricted unpickling and the validation apply.
    """
    path = Path(path)
    if manifest is not None:
        raw = check_small_file(path, manifest, METADATA)
    else:
        try:
            raw = (path / METADATA).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path / METADATA} is missing: {path} is not a DCP checkpoint") from None
    md = unpickle_metadata(raw, path / METADATA)
    validate_metadata(md, path, manifest)
    return md


# A command's progress bar while it reads a checkpoint: called with the bytes of each tensor read.
_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("checkpoint_read_progress", default=None)


@contextlib.contextmanager
def reading_progress(update):
    """Within the block, every checkpoint read calls `update(nbytes)` after each tensor."""
    token = _PROGRESS.set(update)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with metadata read safely up front and tensor bytes verified."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None, manifest: dict | None = None):
        super().__init__(path)
        self.ckpt_path = Path(path)
        self.manifest = manifest
        self._metadata = metadata
        self.progress = _PROGRESS.get()  # a command's progress bar (see `reading_progress`), or None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP's fallback to per-rank metadata files, which dist_gpt never writes.
            raise CheckpointError(f"{self.ckpt_path} has no per-rank metadata")
        if self._metadata is None:
            self._metadata = read_metadata(self.ckpt_path, self.manifest)
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _item_crcs(self, name: str) -> dict | None:
        if self.manifest is None:
            return None
        items = self.manifest["files"].get(name, {}).get("items")
        if not isinstance(items, dict):
            raise CheckpointError(f"DONE of {self.ckpt_path} has no checksums for {name}: the checkpoint is "
                                  f"damaged; delete it or {other_checkpoint()}")
        return items

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in per_file.items():
            file = self.ckpt_path / name
            crcs = self._item_crcs(name)
            with open(file, "rb") as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    self._read_item(f, file, crcs, req, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, f, file: Path, crcs: dict | None, req, planner) -> None:
        fqn = req.storage_index.fqn
        if req.type == LoadItemType.BYTE_IO:
            raise CheckpointError(f"{file}: {fqn!r} is a non-tensor entry; refusing to unpickle it")
        info = self.storage_data[req.storage_index]
        f.seek(info.offset)
        raw = f.read(info.length)
        if len(raw) != info.length:
            raise CheckpointError(f"{file} is truncated ({fqn!r} is cut short): delete checkpoint {self.ckpt_path} "
                                  f"or {other_checkpoint()}")
        if self.progress is not None:
            self.progress(len(raw))
        if crcs is not None and crcs.get(str(info.offset)) != zlib.crc32(raw):
            raise CheckpointError(f"{file} is corrupt: the bytes of {fqn!r} do not match their CRC32 in DONE; "
                                  f"delete checkpoint {self.ckpt_path} or {other_checkpoint()}")
        try:
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{file} is corrupt: {fqn!r} does not load ({type(e).__name__}); delete "
                                  f"checkpoint {self.ckpt_path} or {other_checkpoint()}") from None
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file}: {fqn!r} is a {type(tensor).__name__}, not a tensor; refusing it")
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"{file}: {fqn!r} has shape {list(tensor.size())}, this run expects "
                                  f"{list(target.size())}: resume with the model settings the checkpoint was saved with")
        target.copy_(tensor)
        planner.commit_tensor(req, target)
