"""The shard format: round trip for every dtype, and a clear error naming the file for each kind
of damage (flipped byte, truncation, wrong magic) and for a vocabulary the dtype cannot hold."""

from __future__ import annotations

import numpy as np
import pytest

from dist_gpt.data import Dataset
from dist_gpt.data.format import HEADER_SIZE, ShardWriter, dtype_code_for_vocab, read_header, verify_payload
from dist_gpt.errors import DataError
from tests.data_fixtures import as_version_1, open_memmap, random_dataset, write_shard

FP = "ab" * 32


@pytest.mark.parametrize("vocab, code", [(256, 1), (300, 2), (65536, 2), (65537, 4), (200_000, 4)])
def test_round_trip_each_dtype(tmp_path, vocab, code):
    assert dtype_code_for_vocab(vocab) == code
    tokens = np.random.default_rng(0).integers(0, vocab, 10_001)
    tokens[:2] = [0, vocab - 1]
    path = tmp_path / "s.bin"
    write_shard(path, tokens, vocab, FP)
    header = read_header(path)
    assert (header.dtype_code, header.vocab_size, header.num_tokens, header.tokenizer_fingerprint) == (code, vocab, 10_001, FP)
    verify_payload(path, header)
    assert np.array_equal(open_memmap(path, header), tokens)
    # plain numpy reads it at the documented offset, as docs/FORMAT.md says
    assert np.array_equal(np.memmap(path, dtype=f"<u{code}", mode="r", offset=HEADER_SIZE), tokens)
    assert path.stat().st_size == HEADER_SIZE + code * 10_001


def test_vocabulary_too_large_for_dtype_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not fit uint8"):
        ShardWriter(tmp_path / "a.bin", 1, 300, FP)
    with pytest.raises(DataError, match="does not fit uint16"):
        write_shard(tmp_path / "b.bin", [1, 2], 70_000, FP, dtype_code=2)
    with pytest.raises(DataError, match="uint32"):
        dtype_code_for_vocab(1 << 33)
    with pytest.raises(DataError, match="vocabulary size"):  # ids past the vocabulary never get in
        write_shard(tmp_path / "c.bin", np.array([5, 300], dtype=np.uint16), 300, FP)
    assert not list(tmp_path.iterdir())  # and nothing half-written stays behind


def _shard(tmp_path):
    path = tmp_path / "train_00000.bin"
    write_shard(path, np.arange(5000) % 256, 256, FP)
    return path


def test_flipped_payload_byte_is_caught_by_verify(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 1234] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"{path}.*checksum"):
        verify_payload(path, read_header(path))


def test_flipped_header_byte_is_caught_on_open(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x10  # inside the token count
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"{path}.*header"):
        read_header(path)


def test_truncated_and_wrong_magic(tmp_path):
    path = _shard(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=f"{path}.*truncated"):
        read_header(path)
    path.write_bytes(raw[:100])
    with pytest.raises(DataError, match=f"{path}.*truncated"):
        read_header(path)
    path.write_bytes(b"NOTASHRD" + raw[8:])
    with pytest.raises(DataError, match=f"{path}.*magic"):
        read_header(path)


def test_dataset_open_names_the_bad_shard_and_what_to_rerun(tmp_path):
    d = random_dataset(tmp_path / "ds")
    Dataset.open(d, verify=True)
    shard = d / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    shard.write_bytes(raw[:-1])
    with pytest.raises(DataError, match=f"{shard}.*re-run"):
        Dataset.open(d)
    raw[-1] ^= 0xFF
    shard.write_bytes(raw)
    Dataset.open(d)  # a payload byte flip is not seen by the cheap open ...
    with pytest.raises(DataError, match=f"{shard}.*checksum"):
        Dataset.open(d, verify=True)  # ... but by data.verify=true
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json is missing \(shards without their manifest.*re-run the "
                                        "prepare command that made the dataset, with --force$"):
        Dataset.open(d)
    with pytest.raises(DataError, match="does not exist"):
        Dataset.open(tmp_path / "nowhere")


def test_data_config_section():
    from dataclasses import fields

    from dist_gpt.data import DataConfig
    from dist_gpt.errors import ConfigError
    cfg = DataConfig()
    assert cfg.path == "data/stdlib" and cfg.prepare_if_missing and cfg.prefetch and not cfg.verify
    assert all(f.metadata.get("help") for f in fields(DataConfig))
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(path="")


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_document_index_damage_is_caught(tmp_path):
    from dist_gpt.data.docindex import HEADER_SIZE as INDEX_HEADER
    from dist_gpt.data.shard_tools import verify_dataset

    path = random_dataset(tmp_path / "r")
    ds = Dataset.open(path)
    assert [a.tolist() for a in ds.doc_starts("train", "test")] == [[0], [], []]  # one document, three shards
    index = path / "train.docs"
    assert verify_dataset(path) == []
    _flip(index, INDEX_HEADER)  # the offset 0 becomes 255: only the checksum sees it
    Dataset.open(path)
    (problem,) = verify_dataset(path)
    assert str(index) in problem and "checksum" in problem
    with pytest.raises(DataError, match="checksum.*re-run"):
        Dataset.open(path, verify=True)
    _flip(index, INDEX_HEADER)
    _flip(index, 20)  # the header
    with pytest.raises(DataError, match="train.docs: document index header is corrupt"):
        Dataset.open(path)
    _flip(index, 20)
    index.write_bytes(index.read_bytes()[:-1])
    with pytest.raises(DataError, match="train.docs: file is .*truncated"):
        Dataset.open(path)
    index.unlink()
    with pytest.raises(DataError, match="train.docs: document index is missing"):
        Dataset.open(path)


def test_dataset_without_a_document_index_still_opens(tmp_path, capsys):
    """A dataset made by dist_gpt 0.1.0 (manifest version 1, no index) trains as before; asking
    it for document-aware training is a one-line error saying to re-run prepare."""
    import json

    from dist_gpt.data.prepare import main as prepare_main
    from dist_gpt.data.shard_tools import verify_dataset

    (tmp_path / "a.txt").write_text("some text\n" * 100)
    args = [str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds"), "--val-split", "0.1"]
    assert prepare_main(args + ["--quiet"]) == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for name in as_version_1(manifest):
        (tmp_path / "ds" / name).unlink()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    ds = Dataset.open(tmp_path / "ds", verify=True)
    assert not ds.has_doc_index and verify_dataset(tmp_path / "ds") == []
    with pytest.raises(DataError, match=r"no document index .* which data.align=document needs; re-run `python -m tools.prepare "):
        ds.doc_starts("train", "data.align=document")
    assert prepare_main(args) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "add --force to rebuild it with one" in err


def test_out_of_vocabulary_id_names_the_shard(tmp_path):
    """A payload byte flipped to an id past the vocabulary (not seen by the cheap open) stops the first
    batch that reads it, naming the shard and the command that checks the whole dataset."""
    from dist_gpt.data.tokenizers import CharTokenizer
    from tests.data_fixtures import write_dataset

    d = tmp_path / "ds"
    write_dataset(d, CharTokenizer("abcdefgh"), {"train": [np.arange(2000) % 8], "val": [np.arange(500) % 8]},
                  shard_tokens=700)
    shard = d / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_SIZE + 10] = 200
    shard.write_bytes(raw)
    ds = Dataset.open(d)
    out = np.empty((3, 50), dtype=ds.dtype)
    with pytest.raises(DataError, match=f"^{shard}: token id 200 near token 0 is >= the vocabulary size 8 .*"
                                        f"tools.shards verify {d}"):
        ds.reader("train").read(np.array([0, 1, 2]), np.array([0, 0, 0]), out)


def test_a_data_path_that_is_not_a_dataset_gets_the_hint_that_fits(tiny_data, tmp_path, monkeypatch):
    """A shard file, a text file, a directory of text and nothing at all: each is named for what it is.
    (A shard file was "dataset directory ... does not exist", and raw text was to be prepared into itself.)"""
    monkeypatch.chdir(tmp_path)
    shard = sorted(tiny_data.glob("train_*.bin"))[0]
    with pytest.raises(DataError, match=rf"^{shard} is a file of the dataset {tiny_data}, not a dataset directory: "
                                        rf"pass the dataset's directory, {tiny_data}$"):
        Dataset.open(shard)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text("raw text\n")
    with pytest.raises(DataError, match=rf"^{corpus} is not a dataset \(no manifest.json\) but holds 1 other file\(s\), "
                                        rf"e.g. book.txt: .*`dist-gpt-prepare {corpus} --out data/corpus`"):
        Dataset.open(corpus)
    with pytest.raises(DataError, match=rf"^{corpus / 'book.txt'} is a file, not a dataset directory: .*"
                                        rf"`dist-gpt-prepare {corpus / 'book.txt'} --out data/book`"):
        Dataset.open(corpus / "book.txt")
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "notes.md").write_text("text already under data/\n")
    with pytest.raises(DataError, match=r"`dist-gpt-prepare data/corpus --out data/corpus-tokens`"):
        Dataset.open("data/corpus")  # never into itself
    with pytest.raises(DataError, match=r"^dataset directory data/new does not exist; build the default dataset there "
                                        r"with `dist-gpt-prepare --source stdlib --tokenizer byte --out data/new`"):
        Dataset.open("data/new")
