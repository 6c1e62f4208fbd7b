"""bench/doc_bench.py's arithmetic, without training: losses at equal steps and at equal training
time, per seed against the plain run, and the report made again from saved results. (The benchmark
itself is run by hand: docs/RECIPES.md.)"""

from __future__ import annotations

import json

import pytest

from bench import doc_bench as db
from bench.recipe_bench import Run


def _runs():
    """Per seed: plain reaches 1.5 in 100 s; align the same curve but 10% lower; mask 25% slower
    steps (125 s) and lower at the end; align+mask like mask."""
    out = []
    for seed in (0, 1, 2):
        out.append(Run("plain", "modern", seed, 300, times=[0.0, 50.0, 100.0], val=[5.0, 2.0, 1.5]))
        out.append(Run("align", "modern", seed, 300, times=[0.0, 50.0, 100.0], val=[4.5, 1.8, 1.35]))
        for name in ("mask", "align+mask"):
            out.append(Run(name, "modern", seed, 300, times=[0.0, 62.5, 125.0], val=[5.0, 1.9, 1.4]))
    return out


def test_equal_steps_and_equal_time(tmp_path):
    data = tmp_path / "paragraphs"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "tokenizer": {"name": "char"}, "vocab_size": 100,
        "splits": {"train": {"num_tokens": 1000}, "val": {"num_tokens": 100, "documents": 3}}}))
    s = db.summarize(data, _runs())
    assert s["settings"]["align"]["d_steps"] == pytest.approx(-0.15)
    assert s["settings"]["align"]["d_time"] == pytest.approx(-0.15)  # the same times: equal steps are equal time
    mask = s["settings"]["mask"]
    assert mask["d_steps"] == pytest.approx(-0.1)
    # at plain's 100 s the masked run is 60% of its way from 1.9 (at 62.5 s) to 1.4 (at 125 s)
    assert mask["at_equal_time"] == pytest.approx(1.9 - 0.5 * 37.5 / 62.5)
    assert mask["d_time"] == pytest.approx(1.9 - 0.5 * 37.5 / 62.5 - 1.5)
    assert mask["per_seed_d_time"] == [pytest.approx(mask["d_time"])] * 3
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"paragraphs": s}))
    db.main(["--from-results", str(results)])


def test_report_from_saved_results(tmp_path, capsys):
    test_equal_steps_and_equal_time(tmp_path)
    out = capsys.readouterr().out
    assert "== paragraphs: char tokens, vocab 100" in out and "align+mask" in out
