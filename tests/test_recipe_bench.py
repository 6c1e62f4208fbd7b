"""bench/recipe_bench.py's arithmetic, without training: how the time to reach the classic
recipe's loss is read off the curves, which run it comes from, and the report and plot made
again from saved results. (The benchmark itself is run by hand: docs/RECIPES.md.)"""

from __future__ import annotations

import json

import pytest

from bench import recipe_bench as rb


def run(label, recipe, seed, steps, times, val):
    return rb.Run(label, recipe, seed, steps, times=times, val=val, step_ms=times[-1] * 1000 / steps)


def test_time_to_reach_is_linear_between_evaluations():
    r = run("modern-long", "modern", 0, 400, [0.0, 10.0, 20.0], [3.0, 2.0, 1.0])
    assert r.time_to_reach(3.0) == 0.0
    assert r.time_to_reach(1.5) == pytest.approx(15.0)
    assert r.time_to_reach(0.5) is None


def fake_runs():
    classic = [run("classic", "classic", s, 2000, [0.0, 50.0, 100.0], [5.0, 1.6, 1.5]) for s in (0, 1, 2)]
    long = [run("modern-long", "modern", s, 1300, [0.0, 40.0, 80.0], [5.0, 1.45, 1.3]) for s in (0, 1, 2)]
    # seed 0: the 300-step schedule falls short, the 400-step one gets there at 25 s (of classic's 100 s);
    # seed 1: 300 steps are enough, reaching 1.5 at 20 s; seed 2: the ladder never gets there -> long's curve
    ladder = [run("modern-short", "modern", 0, 300, [0.0, 22.0], [5.0, 1.55]),
              run("modern-short", "modern", 0, 400, [0.0, 25.0], [5.0, 1.5]),
              run("modern-short", "modern", 1, 300, [0.0, 10.0, 20.0], [5.0, 2.0, 1.5]),
              run("modern-short", "modern", 2, 850, [0.0, 60.0], [5.0, 1.52])]
    return classic + long + ladder


def test_the_ratio_comes_from_the_first_schedule_that_gets_there(tmp_path):
    data = tmp_path / "stdlib"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "tokenizer": {"name": "byte"}, "vocab_size": 256,
        "splits": {"train": {"num_tokens": 1000}, "val": {"num_tokens": 100, "documents": 1}}}))
    s = rb.summarize(data, fake_runs())
    assert s["per_seed_ratio"][0] == pytest.approx(0.25)
    assert s["per_seed_ratio"][1] == pytest.approx(0.20)
    # seed 2: modern-long crosses 1.5 between 0 s (5.0) and 40 s (1.45): 40 * 3.5 / 3.55
    assert s["per_seed_ratio"][2] == pytest.approx(40 * 3.5 / 3.55 / 100)
    assert s["ratio_from"] == ["modern-short 400 steps", "modern-short 300 steps", "modern-long 1300 steps"]
    assert s["ratio"] == pytest.approx(0.25)
    assert s["equal_time_difference"] == pytest.approx(-0.2)
    assert s["runs"]["classic"]["final_val"] == 1.5


def test_report_and_plot_again_from_saved_results(tmp_path, capsys):
    data = tmp_path / "prose"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "tokenizer": {"name": "char"}, "vocab_size": 100,
        "splits": {"train": {"num_tokens": 1000}, "val": {"num_tokens": 100, "documents": 3}}}))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"prose": rb.summarize(data, fake_runs())}))
    png = tmp_path / "plot.png"
    rb.main(["--from-results", str(results), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "== prose: char tokens, vocab 100" in out
    assert "modern reaches classic's final val 1.5000 in 25.0% of classic's training time 100.0 s" in out
    assert "equal wall time: modern-long 1.3000 after 80.0 s vs classic 1.5000 after 100.0 s (difference -0.2000)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
