"""dist-gpt-shards verify|stats|decode DIR: check, summarize and read a dataset.
(`python -m tools.shards` does the same from the repository root.)

    dist-gpt-shards verify data/stdlib          # headers, checksums, every id < vocab, document indexes
    dist-gpt-shards stats data/stdlib
    dist-gpt-shards decode data/stdlib --split val --start 0 --count 400

`verify` names each bad file and the command to re-run (the one recorded in the manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dist_gpt.data.docindex import check_doc_index
from dist_gpt.data.format import DTYPE_NAMES, iter_payload, read_header, verify_payload
from dist_gpt.data.manifest import MANIFEST, SPLITS, load_manifest
from dist_gpt.data.tokenizers import check_spec_fingerprint, tokenizer_from_spec
from dist_gpt.errors import DataError, UserError
from dist_gpt.progress import progress_bar

PREPARE_HINT = "build it with `dist-gpt-prepare ... --out {path}`"


def _rerun(manifest: dict) -> str:
    cmd = manifest.get("command")
    return f"re-run `{cmd} --force`" if cmd else "re-run the prepare command that made it with --force"


def verify_dataset(path: Path, progress=None) -> list[str]:
    """Every problem found, one line each naming the file (empty list: the dataset is sound);
    `progress(nbytes)` is called as shard payloads are read.

    Everything training and sampling read: the manifest, the tokenizer (its file, its fingerprint and
    what the manifest says of it), every shard's header, checksum and token ids, a non-empty train split.
    """
    path = Path(path)
    manifest = load_manifest(path, PREPARE_HINT.format(path=path))
    problems = _tokenizer_problems(path, manifest)
    tok = manifest["tokenizer"]
    for split in SPLITS:
        entry = manifest["splits"][split]
        if sum(s["num_tokens"] for s in entry["shards"]) != entry["num_tokens"]:
            problems.append(f"{path / MANIFEST}: the {split} token count disagrees with its shards")
        for shard in entry["shards"]:
            shard_path = path / shard["file"]
            try:
                header = read_header(shard_path)
                want = (manifest["vocab_size"], manifest["dtype"], tok["fingerprint"], shard["num_tokens"], shard["sha256"])
                got = (header.vocab_size, DTYPE_NAMES[header.dtype_code], header.tokenizer_fingerprint, header.num_tokens, header.checksum)
                if got != want:
                    raise DataError(f"{shard_path}: header does not match manifest.json (a shard from another run?)")
                verify_payload(shard_path, header, progress)
            except DataError as e:
                problems.append(str(e))
        if "doc_index" in entry:
            try:
                check_doc_index(path, entry, full=True)
            except DataError as e:
                problems.append(str(e))
    if not any(s["num_tokens"] for s in manifest["splits"]["train"]["shards"]):
        problems.append(f"{path / MANIFEST}: the train split is empty")
    return problems


def _tokenizer_problems(path: Path, manifest: dict) -> list[str]:
    """The tokenizer training and sampling build: its file and fingerprint, and the manifest's record of it."""
    tok = manifest["tokenizer"]
    try:
        check_spec_fingerprint(tok["spec"], tok["fingerprint"], path)
        if tok["spec"]["kind"] == "tiktoken":
            return []  # built from tiktoken's own files: nothing of it lives in the dataset
        built = tokenizer_from_spec(tok["spec"], path)
    except (DataError, KeyError, TypeError) as e:
        return [str(e) if isinstance(e, DataError) else f"{path / MANIFEST}: bad tokenizer spec ({type(e).__name__}: {e})"]
    said = {"name": tok.get("name"), "vocab_size": manifest["vocab_size"], "eot_id": tok.get("eot_id"), "file": tok.get("file")}
    real = {"name": built.name, "vocab_size": built.vocab_size, "eot_id": built.eot_id, "file": tok["spec"].get("file")}
    return [f"{path / MANIFEST}: the tokenizer's {key} is {said[key]!r} but the tokenizer it names has {real[key]!r}"
            for key in said if said[key] != real[key]]


def stats(path: Path) -> str:
    manifest = load_manifest(Path(path), PREPARE_HINT.format(path=path))
    tok = manifest["tokenizer"]
    lines = [f"dataset     {path}",
             f"tokenizer   {tok['name']} (vocab {manifest['vocab_size']}, {manifest['dtype']}, "
             f"end-of-text id {tok.get('eot_id')}, fingerprint {tok['fingerprint'][:16]})",
             f"source      {manifest.get('source')}"]
    for split in SPLITS:
        e = manifest["splits"][split]
        bpt = e["source_bytes"] / e["num_tokens"] if e["num_tokens"] else float("nan")
        indexed = "" if "doc_index" in e else " (no document index)"
        lines.append(f"{split:<11} {e['num_tokens']:>14,} tokens  {len(e['shards'])} shards  "
                     f"{e.get('documents', 0):,} documents{indexed}  {e['source_bytes']:,} source bytes  {bpt:.3f} bytes/token")
    return "\n".join(lines)


def decode_slice(path: Path, split: str, start: int, count: int) -> str:
    """Tokens [start, start+count) of a split (across shard boundaries) decoded to text."""
    path = Path(path)
    manifest = load_manifest(path, PREPARE_HINT.format(path=path))
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or val")
    tokenizer = tokenizer_from_spec(manifest["tokenizer"]["spec"], path)
    ids, pos = [], 0
    for shard in manifest["splits"][split]["shards"]:
        n = shard["num_tokens"]
        lo, hi = max(start - pos, 0), min(start + count - pos, n)
        if lo < hi:
            header = read_header(path / shard["file"])
            ids += [a for a in iter_payload(path / shard["file"], header, start=lo, stop=hi)]
        pos += n
    tokens = np.concatenate(ids).tolist() if ids else []
    return tokenizer.decode(tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-gpt-shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("verify", "check headers, checksums and token ids"), ("stats", "summarize a dataset"),
                       ("decode", "print a slice of tokens as text")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dataset", help="dataset directory (manifest.json + shards)")
        if name == "verify":
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "decode":
            p.add_argument("--split", default="val", help="train or val (default val)")
            p.add_argument("--start", type=int, default=0, help="first token (default 0)")
            p.add_argument("--count", type=int, default=400, help="number of tokens (default 400)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            manifest = load_manifest(Path(args.dataset), PREPARE_HINT.format(path=args.dataset))
            total = sum(s["num_tokens"] for split in SPLITS for s in manifest["splits"][split]["shards"])
            itemsize = next((code for code, name in DTYPE_NAMES.items() if name == manifest["dtype"]), 1)
            with progress_bar(total * itemsize, "verify", unit="B", quiet=args.quiet) as bar:
                problems = verify_dataset(Path(args.dataset), bar.update)
            for p in problems:
                print(f"error: {p}; {_rerun(manifest)}", file=sys.stderr)
            if problems:
                return 2
            shards = sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)
            tokens = sum(manifest["splits"][s]["num_tokens"] for s in SPLITS)
            indexes = ", document indexes" if "doc_index" in manifest["splits"]["train"] else ""
            print(f"ok: {args.dataset}: {shards} shards, {tokens:,} tokens, checksums and token ids{indexes} verified")
        elif args.command == "stats":
            print(stats(Path(args.dataset)))
        else:
            sys.stdout.write(decode_slice(Path(args.dataset), args.split, args.start, args.count) + "\n")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
