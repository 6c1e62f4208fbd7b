"""prepare end to end: every offline tokenizer round-trips through prepare, verify and decode; each
input kind; the no-op and --force rules; an interrupted run leaves no partial shard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_gpt.data import Dataset, ensure_default_dataset
from conftest import pause_env, wait_paused
from dist_gpt.data.format import read_header, verify_payload
from dist_gpt.data.prepare import main as prepare_main
from dist_gpt.data.shard_tools import decode_slice, verify_dataset
from dist_gpt.errors import DataError
from tests.data_fixtures import open_memmap

ROOT = Path(__file__).resolve().parents[1]
DOCS = {
    "a.txt": "def f(x):\n    return x * 2\n\nprint(f(21))\n",
    "b.txt": "Ünïcödé text — with “quotes” and emoji 🙂.\nSecond line.\n",
    "sub/c.txt": "class C:\n    pass\n" * 20,
}


def _corpus(tmp_path: Path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_text(text, encoding="utf-8")
    (tmp_path / "corpus" / "skip.md").write_text("not included")
    return tmp_path / "corpus"


def _prepare(*args: str) -> int:
    return prepare_main([*map(str, args), "--quiet"])


def _split_text(out: Path, split: str) -> str:
    return decode_slice(out, split, 0, Dataset.open(out).num_tokens(split))


def _indexed_documents(out: Path, split: str) -> list[str]:
    """The split's text cut where its document index says documents start (one shard here)."""
    ds = Dataset.open(out)
    (starts,) = ds.doc_starts(split, "the test")
    ends = list(starts[1:]) + [ds.num_tokens(split)]
    return [decode_slice(out, split, int(a), int(b - a)) for a, b in zip(starts, ends)]


def _user_tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(DOCS.values()) * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "char", "bpe:300", "user"])
def test_tokenizers_round_trip(tmp_path, tokenizer):
    corpus = _corpus(tmp_path)
    if tokenizer == "user":
        tokenizer = str(_user_tokenizer_json(tmp_path / "my_tokenizer.json"))
    out = tmp_path / "ds"
    assert _prepare(corpus, "--tokenizer", tokenizer, "--val-split", "1", "--out", out, "--workers", "0") == 0
    assert verify_dataset(out) == []
    ds = Dataset.open(out)
    eot = {"byte": "", "char": ""}.get(tokenizer, "</s>" if tokenizer.endswith(".json") else "<|endoftext|>")
    assert (ds.eot_id is None) == (eot == "")
    files = sorted(DOCS)  # the directory's files in order; one of them went to val
    train, val = _split_text(out, "train"), _split_text(out, "val")
    (val_name,) = [n for n in files if val == eot + DOCS[n]]
    assert train == "".join(eot + DOCS[n] for n in files if n != val_name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 2
    # the document index says where each document starts, for every tokenizer (byte and char have no eot)
    assert _indexed_documents(out, "train") == [eot + DOCS[n] for n in files if n != val_name]
    assert _indexed_documents(out, "val") == [eot + DOCS[val_name]]
    assert manifest["splits"]["val"]["source_bytes"] == len(DOCS[val_name].encode())
    assert ds.bytes_per_token("train") > (1.0 if tokenizer.startswith(("bpe", "/")) else 0.99)
    assert ds.tokenizer.decode(ds.tokenizer.encode(DOCS["b.txt"])) == DOCS["b.txt"]
    if tokenizer in ("byte", "char"):
        assert manifest["dtype"] == "uint8"
    else:
        assert (out / "tokenizer.json").is_file() and manifest["dtype"] == "uint16"


def test_verify_checks_the_tokenizer_the_manifest_names(tmp_path):
    """The issue's case, one flipped bit that made tokenizer.json into tokenizes.json, is caught by the
    manifest's checksum; a manifest consistent with itself (resealed, as an older manifest without a
    checksum would be) that names the wrong tokenizer is caught by checking the tokenizer itself."""
    from dist_gpt.data.manifest import write_manifest

    out = tmp_path / "ds"
    assert _prepare(_corpus(tmp_path), "--tokenizer", "bpe:300", "--val-split", "1", "--out", out, "--workers", "0") == 0
    good = (out / "manifest.json").read_bytes()
    corrupt = f"{out / 'manifest.json'}: its checksum does not match its content (the file is damaged or was edited)"
    at = [i for i in range(len(good)) if good.startswith(b'"tokenizer.json"', i)]
    assert len(at) == 2  # the spec's file and the manifest's own record of it
    for i in at:  # r -> s is one flipped bit
        (out / "manifest.json").write_bytes(good[:i + 9] + b"s" + good[i + 10:])
        with pytest.raises(DataError, match="its checksum does not match"):
            verify_dataset(out)
        with pytest.raises(DataError, match=re.escape(corrupt)):
            Dataset.open(out)

    def resealed(change) -> list[str]:
        manifest = json.loads(good)
        change(manifest)
        write_manifest(out, manifest)
        return verify_dataset(out)

    assert resealed(lambda m: m["tokenizer"]["spec"].update(file="tokenizes.json")) == [
        f"tokenizer file {out / 'tokenizes.json'} cannot be read (No such file or directory): the dataset needs it"]
    with pytest.raises(DataError, match="tokenizes.json cannot be read"):
        Dataset.open(out)
    assert resealed(lambda m: m["tokenizer"].update(file="tokenizes.json")) == [
        f"{out / 'manifest.json'}: the tokenizer's file is 'tokenizes.json' but the tokenizer it names has 'tokenizer.json'"]
    eot = json.loads(good)["tokenizer"]["eot_id"]
    assert resealed(lambda m: m["tokenizer"].update(eot_id=eot + 1)) == [
        f"{out / 'manifest.json'}: the tokenizer's eot_id is {eot + 1} but the tokenizer it names has {eot}"]
    (out / "manifest.json").write_bytes(good)
    tok = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(tok.replace(b'"<|endoftext|>"', b'"<|endoftexu|>"', 1))
    assert verify_dataset(out) == [f"{out / 'tokenizer.json'} differs from the tokenizer that made the shards (fingerprint mismatch)"]
    with pytest.raises(DataError, match="tokenizer.json differs"):
        Dataset.open(out)
    (out / "tokenizer.json").write_bytes(tok)
    assert verify_dataset(out) == []
    # a char vocabulary is its spec: another character there changes the fingerprint
    assert _prepare(_corpus(tmp_path), "--tokenizer", "char", "--out", out, "--force") == 0
    good = (out / "manifest.json").read_bytes()
    assert resealed(lambda m: m["tokenizer"]["spec"].update(chars=m["tokenizer"]["spec"]["chars"].replace("a", "`"))) == [
        f"{out / 'manifest.json'}: the tokenizer's spec differs from the tokenizer that made the shards (fingerprint mismatch)"]


def test_char_vocabulary_over_256_uses_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(400)) + "abc"
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "ds"
    assert _prepare(tmp_path / "one.txt", "--tokenizer", "char", "--val-split", "0.25", "--out", out) == 0
    ds = Dataset.open(out)
    assert ds.vocab_size == 403 and ds.manifest["dtype"] == "uint16"
    train, val = _split_text(out, "train"), _split_text(out, "val")
    assert train + val == text and len(val) == round(len(text) * 0.25)  # one document: its tail is val
    assert ds.manifest["splits"]["val"]["source_bytes"] == len(val.encode())
    assert _indexed_documents(out, "train") == [train] and _indexed_documents(out, "val") == [val]


def test_uint32_through_a_large_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"], vocab["<|endoftext|>"] = 70_000, 70_001
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    words = [f"w{i}" for i in (69_999, 3, 65_536, 65_535, 12, 66_000)]
    (tmp_path / "c.txt").write_text(" ".join(words * 50))
    out = tmp_path / "ds"
    assert _prepare(tmp_path / "c.txt", "--tokenizer", tmp_path / "big.json", "--val-split", "0.1", "--out", out) == 0
    ds = Dataset.open(out)
    assert ds.vocab_size == 70_002 and ds.manifest["dtype"] == "uint32" and ds.eot_id == 70_001
    shard = ds.shards["train"][0].path
    ids = np.asarray(open_memmap(shard, read_header(shard)))
    assert ids.dtype == np.uint32 and ids[0] == 70_001 and ids[1:7].tolist() == [69_999, 3, 65_536, 65_535, 12, 66_000]
    assert verify_dataset(out) == []


def test_gpt2_offline_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    # no cached encoding and no route out: the situation of every offline machine
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    corpus = _corpus(tmp_path)
    assert _prepare(corpus, "--tokenizer", "gpt2", "--out", tmp_path / "ds") == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "bpe:N" in err and "tokenizer.json" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.prepare-*"))


def test_jsonl_field_and_errors(tmp_path, capsys):
    lines = [{"text": f"document {i}\n", "id": i} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "ds"
    assert _prepare(tmp_path / "d.jsonl", "--val-split", "2", "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (8, 2)
    train, val = _split_text(out, "train"), _split_text(out, "val")
    assert sorted((train + val).splitlines()) == sorted(f"document {i}" for i in range(10))
    assert sorted(_indexed_documents(out, "train") + _indexed_documents(out, "val")) == sorted(x["text"] for x in lines)
    assert _prepare(tmp_path / "d.jsonl", "--jsonl-field", "body", "--out", tmp_path / "ds2") == 2
    assert "no 'body' field" in capsys.readouterr().err
    # many work units (64 KB each), cut between lines, with a long line and blank lines
    texts = [f"doc {i} " + "x" * (i % 7) * 30 + "\n" for i in range(3000)] + ["long " * 40_000]
    lines = [json.dumps({"text": t}) for t in texts]
    body = "\n".join(lines[:100]) + "\n\n \n" + "\n".join(lines[100:]) + "\n\n"
    (tmp_path / "many.jsonl").write_text(body)
    out = tmp_path / "ds3"
    assert _prepare(tmp_path / "many.jsonl", "--chunk-mb", "0.0625", "--tokenizer", "bpe:300", "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 3001
    eot = "<|endoftext|>"
    got = _split_text(out, "train").split(eot)[1:] + _split_text(out, "val").split(eot)[1:]
    assert sorted(got) == sorted(texts)


def test_stdin(tmp_path):
    text = "piped text\n" * 100
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "tools.prepare", "-", "--out", str(tmp_path / "ds"), "--quiet"],
                         input=text.encode(), cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert _split_text(tmp_path / "ds", "train") + _split_text(tmp_path / "ds", "val") == text
    again = subprocess.run([sys.executable, "-m", "tools.prepare", "-", "--out", str(tmp_path / "ds")],
                           input=text.encode(), cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0 and b"nothing to do" in again.stderr
    other = subprocess.run([sys.executable, "-m", "tools.prepare", "-", "--out", str(tmp_path / "ds")],
                           input=b"other", cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert other.returncode == 2 and b"--force" in other.stderr


def test_same_inputs_no_op_and_force_rule(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "ds"
    assert _prepare(corpus, "--out", out) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    assert prepare_main([str(corpus), "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert before == {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    # other options: refused, the old dataset untouched
    assert _prepare(corpus, "--out", out, "--tokenizer", "char") == 2
    assert "--force" in capsys.readouterr().err
    assert before == {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    # other inputs: refused too
    (corpus / "new.txt").write_text("more")
    assert _prepare(corpus, "--out", out) == 2
    assert "other inputs" in capsys.readouterr().err
    assert _prepare(corpus, "--out", out, "--tokenizer", "char", "--force") == 0
    assert Dataset.open(out).manifest["tokenizer"]["name"] == "char"
    # a directory that is not a dataset is never overwritten, even with --force
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert _prepare(corpus, "--out", tmp_path / "mine", "--force") == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_output_does_not_depend_on_workers(tmp_path):
    corpus = _corpus(tmp_path)
    for i in range(30):
        (corpus / f"gen{i:02d}.txt").write_text(f"generated file {i}\n" * (200 + 37 * i))
    sums = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert _prepare(corpus, "--tokenizer", "char", "--workers", workers, "--chunk-mb", "0.0625",
                        "--shard-tokens", "5000", "--out", out) == 0
        sums.append(Dataset.open(out).fingerprint)
    assert sums[0] == sums[1]


def _children(pid: int) -> set[int]:
    """The processes `pid` started (Linux: /proc/PID/task/*/children)."""
    return {int(c) for t in Path(f"/proc/{pid}/task").glob("*")
            for c in (t / "children").read_text().split()}


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited, its reaper just hasn't looked


def test_interrupted_prepare_leaves_no_partial_shard(tmp_path):
    big = tmp_path / "big.txt"
    line = ("the quick brown fox jumps over the lazy dog " * 3 + "\n").encode()
    big.write_bytes(line * (3_000_000 // len(line)))  # three shards of 1M tokens
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tools.prepare", str(big), "--tokenizer", "char", "--workers", "1",
           "--shard-tokens", "1000000", "--out", str(out), "--quiet"]
    for sig in (signal.SIGINT, signal.SIGKILL):
        # prepare holds after renaming its first shard until the signal comes (dist_gpt.hooks.pause)
        hold = tmp_path / f"pause-{sig.name}"
        # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across
        # exec: were pytest started so, prepare would never see the Ctrl-C. A handler here is reset to the
        # default in the child, where Python then installs its KeyboardInterrupt handler.
        ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:  # a session of its own, so that whatever happens below, nothing it started outlives the test
            proc = subprocess.Popen(cmd, env={**env, **pause_env(hold, "shard")}, cwd=tmp_path,
                                    stderr=subprocess.PIPE, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, ignored)
        try:
            wait_paused(hold, "shard", 1, lambda: proc.poll() is None)
            (staging,) = tmp_path.glob(".ds.prepare-*")
            (first,) = staging.glob("*.bin")  # one complete shard when the signal is sent, the rest to come
            assert first.name == "train_00000.bin"
            verify_payload(first, read_header(first))
            helpers = _children(proc.pid)  # the encoding worker and multiprocessing's resource tracker
            proc.send_signal(sig)
            proc.wait(timeout=60)
            assert not out.exists()  # nothing reaches --out before the dataset is complete and verified
            if sig == signal.SIGINT:
                assert proc.returncode == 130 and b"interrupted" in proc.stderr.read()
                assert not list(tmp_path.glob(".ds.prepare-*"))  # and the partial work is removed
            else:  # a kill leaves the staging directory: complete shards, at most one .tmp, no manifest
                (staging,) = tmp_path.glob(".ds.prepare-*")
                for shard in staging.glob("*.bin"):
                    read_header(shard)
                assert not (staging / "manifest.json").exists()
            # prepare's helpers end with it, even when it was killed outright (they notice their parent
            # is gone); the timeout only bounds a failure
            deadline = time.monotonic() + 120
            while not all(_gone(pid) for pid in helpers):
                assert time.monotonic() < deadline, f"prepare's helper processes outlived it: {sorted(helpers)}"
                time.sleep(0.1)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    assert subprocess.run(cmd, env=env, cwd=tmp_path, timeout=300).returncode == 0
    assert not list(tmp_path.glob(".ds.prepare-*"))  # the dead run's leftovers were cleaned up
    assert verify_dataset(out) == []


def test_notebook_layout_round_trip(tmp_path):
    train_text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind...\n" * 30
    val_text = "Thus conscience does make cowards of us all.\n" * 10
    (tmp_path / "vocab.txt").write_text("".join(sorted(set(train_text + val_text))) + "\n", encoding="utf-8")
    (tmp_path / "train_split.txt").write_text(train_text, encoding="utf-8")
    (tmp_path / "val_split.txt").write_text(val_text, encoding="utf-8")
    out = tmp_path / "ds"
    assert _prepare("--train", tmp_path / "train_split.txt", "--val", tmp_path / "val_split.txt",
                    "--tokenizer", "char", "--vocab", tmp_path / "vocab.txt", "--out", out) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    verify = subprocess.run([sys.executable, "-m", "tools.shards", "verify", str(out)], env=env, capture_output=True, timeout=120)
    assert verify.returncode == 0 and b"ok" in verify.stdout
    decoded = subprocess.run([sys.executable, "-m", "tools.shards", "decode", str(out), "--split", "val",
                              "--count", str(len(val_text))], env=env, capture_output=True, timeout=120)
    assert decoded.stdout.decode("utf-8") == val_text + "\n"
    assert _split_text(out, "train") == train_text
    # ids exactly as the notebook assigns them: the sorted set of the vocabulary file's characters
    with open(tmp_path / "vocab.txt", encoding="utf-8") as f:
        chars = sorted(set(f.read()))
    stoi = {c: i for i, c in enumerate(chars)}
    shard = Dataset.open(out).shards["train"][0].path
    assert np.asarray(open_memmap(shard, read_header(shard))).tolist() == [stoi[c] for c in train_text]


def test_notebook_layout_unknown_characters(tmp_path, capsys):
    (tmp_path / "vocab.txt").write_text("abc \n", encoding="utf-8")
    (tmp_path / "train.txt").write_bytes("abc abc\r\nab€c\n".encode())
    (tmp_path / "val.txt").write_text("cab\n")
    args = ["--train", tmp_path / "train.txt", "--val", tmp_path / "val.txt", "--tokenizer", "char",
            "--vocab", tmp_path / "vocab.txt", "--out", tmp_path / "ds"]
    assert _prepare(*args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.txt'}: byte offset 11: character '€' (U+20AC)" in err  # after "abc abc\r\nab"
    assert prepare_main([*map(str, args), "--skip-unknown"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 characters outside the vocabulary" in err and "skipped 1 carriage returns" in err
    assert _split_text(tmp_path / "ds", "train") == "abc abc\nabc\n"
    (tmp_path / "bad.txt").write_bytes(b"ab\xffc\n")
    assert _prepare("--train", tmp_path / "bad.txt", "--val", tmp_path / "val.txt", "--tokenizer", "char",
                    "--vocab", tmp_path / "vocab.txt", "--out", tmp_path / "ds2") == 2
    assert "bad.txt: byte offset 2: not valid UTF-8" in capsys.readouterr().err


def test_ensure_default_dataset(stdlib_data):
    """conftest's stdlib_data is ensure_default_dataset's build; a second call finds it and leaves it."""
    path = stdlib_data
    ds = Dataset.open(path)
    assert ds.vocab_size == 256 and ds.num_tokens("train") > 1_000_000 and ds.num_tokens("val") > 10_000
    assert ds.manifest["source"]["kind"] == "stdlib"
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_default_dataset(path) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_empty_input_is_refused_naming_it(tmp_path, capsys, tokenizer):
    (tmp_path / "empty.txt").touch()
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    for inputs in (["empty.txt"], ["blank.jsonl"], ["blank.jsonl", "empty.txt"]):
        assert _prepare(*[tmp_path / i for i in inputs], "--tokenizer", tokenizer, "--out", tmp_path / "ds") == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {tmp_path / inputs[0]}") and "no text to make a dataset from" in line
        assert ("1 other input:" in line) == (len(inputs) == 2)
        assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.prepare-*"))


def test_user_errors_are_one_line(tmp_path, capsys):
    assert _prepare(tmp_path / "missing.txt", "--out", tmp_path / "ds") == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist"):
        Dataset.open(tmp_path / "ds")
    assert _prepare(_corpus(tmp_path), "--tokenizer", "bpe:10", "--out", tmp_path / "ds") == 2
    assert "N >= 258" in capsys.readouterr().err
