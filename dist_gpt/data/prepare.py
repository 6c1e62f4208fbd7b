"""dist-gpt-prepare (or, from the repository root, python -m tools.prepare): turn a corpus into a verified
dataset of token shards.

    dist-gpt-prepare --source stdlib --tokenizer byte --out data/stdlib     # the default dataset
    dist-gpt-prepare corpus/ --include '*.txt' --tokenizer bpe:8192 --out data/mine
    dist-gpt-prepare docs.jsonl --text-field text --tokenizer gpt2 --out data/web
    dist-gpt-prepare shards/ --include '*.parquet' --tokenizer bpe:8192 --out data/web
    dist-gpt-prepare dump/ --include '*.jsonl.zst,*.jsonl.gz' --tokenizer bpe:8192 --out data/dump
    dist-gpt-prepare --train train_split.txt --val val_split.txt \\
        --tokenizer char --vocab vocab.txt --out data/notebook                   # the notebook's files
    cat book.txt | dist-gpt-prepare - --tokenizer char --out data/book

The dataset is built in a hidden staging directory beside --out (each shard under a temporary name,
renamed when complete), verified, and only then moved to --out: an interrupted run leaves nothing
half-written. Run again with the same inputs and options and prepare says the dataset is complete
and touches nothing; a dataset made from other inputs or options is only replaced with --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dist_gpt.data import encode
from dist_gpt.data.format import DTYPE_NAMES, HEADER_SIZE, iter_payload, truncate_shard
from dist_gpt.data.manifest import MANIFEST, load_manifest
from dist_gpt.data.shard_tools import verify_dataset
from dist_gpt.data.sources import (CHUNK_BYTES, InputFile, describe, inputs_fingerprint, list_inputs,
                                   spool_stdin, stdlib_inputs)
from dist_gpt.data.units import count_docs, plan_units
from dist_gpt.data.tokenizers import (TOKENIZER_FILE, ByteTokenizer, CharTokenizer, HFTokenizer, TiktokenTokenizer,
                                      read_char_vocab)
from dist_gpt.data.writer import DEFAULT_SHARD_TOKENS, DatasetWriter
from dist_gpt.errors import ConfigError, DataError, UserError
from dist_gpt.processes import pid_alive
from dist_gpt.progress import progress_bar

DEFAULT_STDLIB_OUT = "data/stdlib"


@dataclass
class PrepareOptions:
    out: str | None = None
    inputs: list[str] = field(default_factory=list)
    source: str | None = None            # "stdlib" for the embedded default corpus
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    tokenizer: str = "byte"
    vocab: str | None = None
    eot: str | None = None
    include: str = "*.txt,*.jsonl"
    jsonl_field: str = "text"
    val_split: float = 0.05
    seed: int = 0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int | None = None
    chunk_mb: float = CHUNK_BYTES / 2**20
    bpe_train_mb: int = 1024
    skip_unknown: bool = False
    force: bool = False
    verify: bool = True
    progress: bool = True
    command: str | None = None

    def output_options(self) -> dict:
        """The options that change the bytes of the dataset (workers and progress do not)."""
        keep = ("eot", "include", "jsonl_field", "val_split", "seed", "shard_tokens",
                "chunk_mb", "bpe_train_mb", "skip_unknown")
        return {k: getattr(self, k) for k in keep}


def _say(opts: PrepareOptions, message: str) -> None:
    if opts.progress:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs and identity

def _gather_inputs(opts: PrepareOptions, staging: Path) -> tuple[list, dict, str]:
    """(files, source summary, inputs fingerprint)."""
    include = [g for g in opts.include.split(",") if g]
    if opts.source is not None:
        if opts.source != "stdlib":
            raise ConfigError(f"--source {opts.source!r}: the only built-in source is 'stdlib'")
        if opts.inputs or opts.train or opts.val:
            raise ConfigError("--source stdlib takes no input files")
        files = stdlib_inputs()
        return files, describe(files, "stdlib"), inputs_fingerprint(files)
    if not (opts.inputs or opts.train):
        raise ConfigError("no input: give files or directories, '-' for stdin, --train/--val, or --source stdlib")
    if opts.val and not (opts.inputs or opts.train):
        raise ConfigError("--val needs training inputs too (--train FILE)")
    forced = "train" if opts.val else None
    files, ident = [], []
    for arg in opts.inputs + opts.train:
        if arg == "-":
            f, sha = spool_stdin(staging / "stdin.txt")
            files.append(InputFile(f.path, f.kind, f.size, f.mtime_ns, forced))
            ident.append("stdin:" + sha)
        else:
            found = list_inputs([arg], include, forced)
            files += found
            ident.append(inputs_fingerprint(found))
    val_files = list_inputs(opts.val, include, "val") if opts.val else []
    files += val_files
    ident.append(inputs_fingerprint(val_files))
    kind = "stdin" if "-" in opts.inputs + opts.train else "files"
    summary = describe(files, kind)
    if opts.val:
        summary["layout"] = "explicit train/val inputs"
    return files, summary, hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def _no_text(files: list) -> DataError:
    """A corpus with nothing to encode: refused here, not made into an empty "verified" dataset."""
    others = len(files) - 1
    names = files[0].path + (f" and {others} other input{'s' if others > 1 else ''}" if others else "")
    return DataError(f"{names}: no text to make a dataset from (empty input); give files that hold text")


def _tokenizer_identity(opts: PrepareOptions) -> dict:
    ident = {"tokenizer": opts.tokenizer, "vocab": None}
    if _is_tokenizer_file(opts.tokenizer):
        ident["tokenizer"] = {"file": str(Path(opts.tokenizer).resolve()), "sha256": _sha256_file(opts.tokenizer)}
    if opts.vocab:
        ident["vocab"] = {"file": str(Path(opts.vocab).resolve()), "sha256": _sha256_file(opts.vocab)}
    return ident


def _sha256_file(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _is_tokenizer_file(arg: str) -> bool:
    return arg.endswith(".json") or Path(arg).is_file()


# ---------------------------------------------------------------- the output directory

def _check_existing(out: Path, request: dict, opts: PrepareOptions) -> bool:
    """True when out already holds exactly this dataset. Refuses to replace another without --force."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if (out / MANIFEST).is_file():
        try:
            existing = load_manifest(out, "")
        except DataError:
            existing = {}
        if existing.get("request") == request:
            return True
        if not opts.force:
            old = existing.get("request", {})
            what = [k for k in ("tokenizer", "inputs", "options") if old.get(k) != request.get(k)] or ["manifest"]
            raise DataError(f"{out} already holds a dataset made from other {' and '.join(what)}; "
                            "pass --force to replace it, or choose another --out")
        return False
    ours = {MANIFEST, TOKENIZER_FILE, MANIFEST + ".tmp"}
    strangers = [p.name for p in out.iterdir() if not (p.name in ours or p.suffix in (".bin", ".docs", ".tmp"))]
    if strangers:
        raise DataError(f"--out {out} is not empty and not a dataset (it holds {strangers[0]!r}, ...); choose a new directory")
    return False


def _staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside out; stale ones of dead prepare runs are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.prepare-"
    for stale in out.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _commit(staging: Path, out: Path) -> None:
    """Move the verified dataset into place; an old one (with --force) is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------- parallel encoding

def _tasks(units, chunk_bytes: int):
    """Group units into tasks of about chunk_bytes (many small files share one task)."""
    task, size = [], 0
    for unit in units:
        task.append(unit)
        size += unit.end - unit.start
        if size >= chunk_bytes:
            yield task
            task, size = [], 0
    if task:
        yield task


def _ordered_map(fn, tasks, workers: int, initargs: tuple):
    """fn over tasks in order, at most 2 * workers in flight (bounded memory); workers=0: in-process."""
    if workers == 0:
        encode.init_worker(*initargs, library_threads=True)
        for task in tasks:
            yield fn(task)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_start, initargs=initargs)
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_start(*initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="prepare-parent", daemon=True).start()
    encode.init_worker(*initargs, library_threads=False)


def _exit_with_parent(parent: int) -> None:
    """A worker whose prepare was killed outright (SIGKILL, OOM) would wait on the pool's queue forever:
    it holds that queue's write end itself, so it never reads an end of file. It leaves instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _progress(opts: PrepareOptions, total: int, desc: str):
    return progress_bar(total, desc, unit="B", quiet=not opts.progress)


def _default_workers(opts: PrepareOptions, tokenizer_arg: str) -> int:
    if opts.workers is not None:
        if opts.workers < 0:
            raise ConfigError("--workers must be 0 (in-process) or more")
        return opts.workers
    if tokenizer_arg == "byte":
        return 0  # the bytes are the tokens: a copy, which workers would only repeat
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------- tokenizers

@dataclass
class CorpusPass:
    """What another pass over the corpus needs: its files, `units()` (a fresh, lazy plan of work units),
    the worker processes and their encoding options, and the bytes per task."""

    files: list
    units: Callable[[], Iterator]
    workers: int
    enc_base: encode.EncodeOptions
    chunk: int


def _build_tokenizer(opts, staging: Path, corpus: CorpusPass, splitter):
    """The tokenizer --tokenizer names; char and bpe:N first read the corpus to build it."""
    arg = opts.tokenizer
    if opts.vocab and arg != "char":
        raise ConfigError("--vocab is for --tokenizer char")
    if opts.eot and not _is_tokenizer_file(arg):
        raise ConfigError("--eot names the end-of-text token of a tokenizer.json file")
    if arg == "byte":
        return ByteTokenizer()
    if arg == "gpt2":
        return TiktokenTokenizer("gpt2")
    if arg == "char":
        if opts.vocab:
            return read_char_vocab(opts.vocab)
        chars: set[str] = set()
        files = corpus.files
        with _progress(opts, sum(f.size for f in files), "characters") as bar:
            tasks = _tasks(corpus.units(), corpus.chunk)
            for results in _ordered_map(encode.collect_chars_task, tasks, corpus.workers, (corpus.enc_base, None)):
                for r in results:
                    chars.update(r.chars)
                    bar.update(r.raw_bytes)
        if not chars:
            raise _no_text(files)
        return CharTokenizer("".join(sorted(chars)))
    if arg.startswith("bpe:"):
        limit = opts.bpe_train_mb * 10**6
        files = corpus.files
        if splitter is None and not any(f.split for f in files):  # one document: keep off its val tail
            limit = min(limit, int(sum(f.size for f in files) * (1 - opts.val_split)))
        return _train_bpe(opts, staging, corpus.units, corpus.enc_base, limit)
    if _is_tokenizer_file(arg):
        if not Path(arg).is_file():
            raise DataError(f"--tokenizer {arg}: file not found (expected byte, char, bpe:N, gpt2 or a tokenizer.json)")
        shutil.copyfile(arg, staging / TOKENIZER_FILE)
        return HFTokenizer(staging / TOKENIZER_FILE, Path(arg).name, opts.eot)
    raise ConfigError(f"--tokenizer {arg!r}: choose byte, char, bpe:N, gpt2 or a tokenizer.json path")


def _train_bpe(opts, staging: Path, units, enc_options, limit: int) -> HFTokenizer:
    try:
        n = int(opts.tokenizer.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 258:
        raise ConfigError(f"--tokenizer {opts.tokenizer}: bpe:N needs N >= 258 (256 bytes + <|endoftext|> + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n, special_tokens=["<|endoftext|>"],
                                  show_progress=opts.progress and sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _say(opts, f"training a byte-level BPE of {n} tokens on up to {opts.bpe_train_mb} MB of the train split")
    encode.init_worker(enc_options, None, library_threads=True)
    tok.train_from_iterator(encode.iter_train_texts(units(), limit), trainer)
    tok.save(str(staging / TOKENIZER_FILE))
    return HFTokenizer(staging / TOKENIZER_FILE, f"bpe:{n}", "<|endoftext|>")


# ---------------------------------------------------------------- the pipeline

def _splitter(opts: PrepareOptions, num_docs: int | None):
    """Exactly the requested number of validation documents when the corpus' document count is
    known before encoding; each document with probability --val-split when it is not."""
    v = opts.val_split
    if v < 0 or (v >= 1 and v != int(v)):
        raise ConfigError(f"--val-split {v}: a fraction in [0, 1) or a whole number of documents")
    if num_docs is not None:
        return encode.DocSplitter(num_docs, _val_docs(v, num_docs), opts.seed)
    return encode.HashSplitter(v, opts.seed) if v > 0 else None


def _val_docs(v: float, num_docs: int) -> int:
    k = int(v) if v >= 1 else round(v * num_docs)
    if k >= num_docs:
        raise ConfigError(f"--val-split {v}: the corpus has only {num_docs} documents; leave some for training")
    return max(k, 1 if v > 0 else 0)


def prepare(opts: PrepareOptions) -> Path:
    if opts.out is None:
        if opts.source != "stdlib":
            raise ConfigError("--out DIR is required (where the dataset goes)")
        opts.out = DEFAULT_STDLIB_OUT
    if opts.shard_tokens < 1:
        raise ConfigError("--shard-tokens must be positive")
    out = Path(opts.out)
    staging = _staging_dir(out)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        files, source, inputs_id = _gather_inputs(opts, staging)
        if not any(f.size for f in files):
            raise _no_text(files)
        request = {**_tokenizer_identity(opts), "inputs": inputs_id, "options": opts.output_options()}
        if _check_existing(out, request, opts):
            _say(opts, f"dataset {out} is complete and made from the same inputs and options: nothing to do")
            if "doc_index" not in load_manifest(out, "")["splits"]["train"]:
                _say(opts, "it has no document index (made by dist_gpt 0.1.0): data.align=document and "
                           "model.doc_mask need one; add --force to rebuild it with one")
            shutil.rmtree(staging)
            return out
        _build(opts, staging, files, source, request)
        if opts.verify:
            with _progress(opts, _payload_bytes(staging), "verify") as bar:
                problems = verify_dataset(staging, bar.update)
            if problems:
                raise DataError(f"the new dataset failed verification: {problems[0]}")
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    _say(opts, f"dataset ready at {out}" + (" (verified)" if opts.verify else ""))
    return out


def _payload_bytes(directory: Path) -> int:
    """Bytes of token payload in a dataset directory (what verification reads)."""
    return sum(p.stat().st_size - HEADER_SIZE for p in directory.glob("*.bin"))


def _build(opts: PrepareOptions, staging: Path, files, source: dict, request: dict) -> None:
    t0 = time.perf_counter()
    doc_counts = _count_documents(opts, files)
    num_docs = None if None in doc_counts else sum(doc_counts)
    explicit = any(f.split for f in files)
    single = not explicit and num_docs == 1
    if single and opts.val_split >= 1:
        raise ConfigError("--val-split N counts documents, and this corpus is one document: use a fraction")
    splitter = None if explicit or single else _splitter(opts, num_docs)
    chunk = max(1 << 16, int(opts.chunk_mb * 2**20))
    enc_base = encode.EncodeOptions({}, str(staging), files, splitter, opts.jsonl_field, opts.skip_unknown)
    workers = _default_workers(opts, opts.tokenizer)

    def units():  # a fresh, lazy pass over the inputs (streamed files are read again by each pass)
        return plan_units(files, doc_counts, chunk, opts.jsonl_field)

    tokenizer = _build_tokenizer(opts, staging, CorpusPass(files, units, workers, enc_base, chunk), splitter)
    enc = encode.EncodeOptions(tokenizer.spec, str(staging), files, splitter, opts.jsonl_field, opts.skip_unknown)
    writer = DatasetWriter(staging, tokenizer, opts.shard_tokens)
    dtype = DTYPE_NAMES[writer.dtype_code]
    skipped: dict[str, int] = {}
    records = []  # (tokens, source bytes) per unit: the single-document split needs them
    total_bytes = sum(f.size for f in files)
    docs = f"{num_docs} documents" if num_docs is not None else "documents counted as they are read"
    _say(opts, f"encoding {total_bytes / 1e6:.1f} MB in {len(files)} files ({docs}) with {tokenizer.name} "
               f"(vocab {tokenizer.vocab_size}, {dtype}), {workers or 'no'} worker processes")
    t_enc = time.perf_counter()
    try:
        with _progress(opts, total_bytes, "encode") as bar:
            ntok = 0
            for results in _ordered_map(encode.encode_task, _tasks(units(), chunk), workers, (enc, dtype)):
                for r in results:
                    for split, tokens in r.tokens.items():
                        writer.write(split, tokens, r.source_bytes.get(split, 0), r.doc_starts.get(split, ()))
                        ntok += tokens.size
                    for k, v in r.skipped.items():
                        skipped[k] = skipped.get(k, 0) + v
                    if single:
                        records.append((sum(t.size for t in r.tokens.values()), sum(r.source_bytes.values())))
                    bar.update(r.raw_bytes)
                bar.set_postfix_str(f"{ntok:,} tokens", refresh=False)
        if ntok == 0:  # e.g. .jsonl lines whose text is empty
            raise _no_text(files)
        encode_s = time.perf_counter() - t_enc
        if single:
            _split_tail(writer, opts.val_split, records)
    except BaseException:
        writer.abort()
        raise
    for what, n in skipped.items():
        _say(opts, f"skipped {n:,} {what}")
    source = {**source, "skipped": skipped}
    manifest = writer.finish(source, request, opts.command,
                             extra={"prepare_seconds": round(time.perf_counter() - t0, 3),
                                    "encode_mb_per_s": round(total_bytes / 1e6 / max(encode_s, 1e-9), 2)})
    for split in ("train", "val"):
        e = manifest["splits"][split]
        _say(opts, f"{split}: {e['num_tokens']:,} tokens in {len(e['shards'])} shards, {e['documents']:,} documents")
    if manifest["splits"]["val"]["num_tokens"] == 0:
        _say(opts, "warning: the val split is empty (evaluation needs one: use --val-split or --val)")


def _count_documents(opts: PrepareOptions, files: list[InputFile]) -> list[int | None]:
    """Each file's documents. `--val-split N` (a count) needs them before encoding, so compressed
    .jsonl files are then decompressed once more just to count their lines (with a progress bar);
    a fraction does not, and they are read once."""
    count = opts.val_split >= 1
    compressed = sum(f.size for f in files if f.compression and f.kind == "jsonl") if count else 0
    if not compressed:
        return [count_docs(f, opts.jsonl_field) for f in files]
    _say(opts, f"--val-split {opts.val_split:g} counts documents: reading the compressed .jsonl once more "
               "to count them")
    with _progress(opts, compressed, "count documents") as bar:
        return [count_docs(f, opts.jsonl_field, read_compressed=True, progress=bar.update) for f in files]


def _split_tail(writer: DatasetWriter, fraction: float, records: list[tuple[int, int]]) -> None:
    """One document: move its last `fraction` of tokens from the train shards to val."""
    writer.close_shard("train")
    shards = writer.shards["train"]
    total = sum(h.num_tokens for _, h in shards)
    n_val = round(total * fraction)
    if fraction > 0 and n_val == 0 and total > 1:
        n_val = 1
    keep_total = total - n_val
    if n_val == 0:
        return
    if keep_total < 1:
        raise ConfigError(f"--val-split {fraction} leaves no training tokens")
    kept, pos = [], 0
    for name, header in shards:
        path = writer.directory / name
        keep = min(max(keep_total - pos, 0), header.num_tokens)
        for chunk in iter_payload(path, header, start=keep):
            writer.write("val", chunk, doc_starts=[0] if writer.written["val"] == 0 else ())  # the tail
        if keep == header.num_tokens:
            kept.append((name, header))
        elif keep > 0:
            kept.append((name, truncate_shard(path, header, keep)))
        else:
            path.unlink()
        pos += header.num_tokens
    writer.shards["train"] = kept
    # source bytes of the val part: exact from each token's byte length where the tokenizer
    # knows them; otherwise the units after the cut plus the cut unit pro rata
    writer.close_shard("val")
    lengths = writer.tokenizer.byte_lengths()
    val_bytes, pos = 0.0, 0
    if lengths is not None:
        for name, header in writer.shards["val"]:
            val_bytes += sum(int(lengths[c].sum()) for c in iter_payload(writer.directory / name, header))
    else:
        for tokens, nbytes in records:
            if pos + tokens > keep_total and tokens:
                val_bytes += nbytes * (pos + tokens - max(pos, keep_total)) / tokens
            pos += tokens
    writer.source_bytes["train"] -= round(val_bytes)
    writer.source_bytes["val"] += round(val_bytes)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> PrepareOptions:
    d = PrepareOptions()
    p = argparse.ArgumentParser(prog="dist-gpt-prepare", description=" ".join(__doc__.splitlines()[0:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[3:11]))
    p.add_argument("inputs", nargs="*", help="files, directories (recursive, see --include), .jsonl, .parquet, "
                                             ".jsonl.gz/.zst, .txt.gz/.zst files, or - for stdin")
    p.add_argument("--source", choices=["stdlib"], help="stdlib: the Python standard library's own source (the default dataset)")
    p.add_argument("--out", help=f"dataset directory to create (default with --source stdlib: {DEFAULT_STDLIB_OUT})")
    p.add_argument("--train", action="append", default=[], metavar="FILE", help="training input (repeatable)")
    p.add_argument("--val", action="append", default=[], metavar="FILE",
                   help="validation input (repeatable); then no split is made and every other input is training data")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte | char | bpe:N | gpt2 | path/to/tokenizer.json (default byte)")
    p.add_argument("--vocab", help="char only: a vocabulary file; ids = its sorted set of characters (the notebook's vocab.txt)")
    p.add_argument("--eot", help="tokenizer.json only: its end-of-text token (default: the first of <|endoftext|>, </s>, ...)")
    p.add_argument("--include", default=d.include, help=f"comma-separated name globs for directory inputs (default {d.include})")
    p.add_argument("--text-field", "--jsonl-field", dest="jsonl_field", default=d.jsonl_field,
                   help=f"the text field of .jsonl lines and the text column of .parquet files (default {d.jsonl_field})")
    p.add_argument("--val-split", type=float, default=d.val_split,
                   help="validation documents: a fraction (< 1) or a count (>= 1; compressed .jsonl is then "
                        "decompressed once more to count its documents); one-document corpora: the last "
                        f"fraction of tokens (default {d.val_split})")
    p.add_argument("--seed", type=int, default=d.seed, help="chooses the validation documents (default 0)")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help=f"tokens per shard (default {d.shard_tokens:,})")
    p.add_argument("--workers", type=int, help="encoding processes (default: one per core; byte: 0 = in-process)")
    p.add_argument("--chunk-mb", type=float, default=d.chunk_mb, help="work unit size in MB (bounds worker memory)")
    p.add_argument("--bpe-train-mb", type=int, default=d.bpe_train_mb, help="bpe:N trains on at most this many MB of train text")
    p.add_argument("--skip-unknown", action="store_true",
                   help="drop undecodable bytes and characters outside a char vocabulary (counted) instead of failing")
    p.add_argument("--force", action="store_true", help="replace an existing dataset made from other inputs or options")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the final full verification")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars or messages")
    args = p.parse_args(argv)
    return PrepareOptions(**vars(args), command="python -m tools.prepare " + shlex.join(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        prepare(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to --out (the partial work was removed)", file=sys.stderr)
        return 130
    return 0
