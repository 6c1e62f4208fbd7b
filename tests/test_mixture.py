"""data.mix: the proportion rule, the same stream on any world size, resume across phases, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import EXACT, losses, run_train
from data_fixtures import as_version_1, documents_dataset, random_dataset

from dist_gpt import config as config_mod
from dist_gpt.data import DataConfig
from dist_gpt.data.mixloader import MixtureBatches, open_mixture
from dist_gpt.data.mixture import MixSchedule, integer_weights, round_robin
from dist_gpt.data.tokenizers import CharTokenizer
from tests.data_fixtures import write_dataset
from dist_gpt.errors import ConfigError, DataError

T = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {"web": random_dataset(root / "web", 30000, 3000, 0), "code": random_dataset(root / "code", 9000, 2000, 1),
            "math": documents_dataset(root / "math", train_docs=120, val_docs=20)}


def _cfg(sources, weights="web:0.7,code:0.2,math:0.1", **kw) -> DataConfig:
    parts = [w.split(":") for w in weights.split(",")]
    return DataConfig(mix=",".join(f"{n}:{sources[n]}:{w}" for n, w in parts), **kw)


def _global_stream(mix, world_size, micro, batches=12, B=8, seed=5, **kw):
    """Every global batch reassembled from each rank's micro-batches: (batches, B, T + 1 [+ T])."""
    loaders = [MixtureBatches(mix, T, B, micro, rank=r, world_size=world_size, seed=seed, **kw)
               for r in range(world_size)]
    stream = []
    for _ in range(batches):
        rows = [None] * B
        for r, ld in enumerate(loaders):
            for a, (x, y, *doc) in enumerate(ld.next()):
                for j in range(micro):
                    rows[(a * world_size + r) * micro + j] = torch.cat([x[j], y[j, -1:], *(d[j] for d in doc)])
        stream.append(torch.stack(rows))
    return torch.stack(stream), loaders[0]


def test_weights_hold_in_every_window_and_a_source_wraps_its_epoch(sources):
    """0.7/0.2/0.1 at a global batch of 8: at every batch boundary each source is within one block of its
    share, so every window of whole batches is within two; the 0.1 source runs through several epochs,
    each a fresh permutation of all its blocks."""
    B, batches = 8, 3000
    schedule = MixSchedule([(0, [0.7, 0.2, 0.1])], B)
    source, block = schedule.locate(np.arange(B * batches))
    per_batch = np.stack([np.bincount(s, minlength=3) for s in source.reshape(batches, B)])  # (batches, 3)
    cum = np.concatenate([np.zeros((1, 3)), np.cumsum(per_batch, axis=0)])
    share = np.array([0.7, 0.2, 0.1])
    assert (np.abs(cum - np.arange(batches + 1)[:, None] * B * share) < 1).all()
    for width in (1, 2, 7, 50, 1000):  # every window of `width` batches
        window = cum[width:] - cum[:-width]
        assert (np.abs(window - width * B * share) < 2).all()
    assert (np.abs(per_batch - B * share) < 2).all()
    # each source's blocks are its own counter 0, 1, 2, ... in the order drawn
    for s in range(3):
        assert np.array_equal(block[source == s], np.arange((source == s).sum()))
    mix = open_mixture(_cfg(sources))
    loader = MixtureBatches(mix, T, B, B, seed=5, align="document")  # the same block starts every epoch
    layout = loader.layouts[2]  # math: the 0.1 source
    n = layout.blocks_per_epoch
    drawn = int((source == 2).sum())
    assert drawn > 2 * n  # it wrapped
    shard, start = layout.locate(np.arange(3 * n))
    epochs = [sorted(zip(shard[e * n:(e + 1) * n].tolist(), start[e * n:(e + 1) * n].tolist())) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] and len(set(epochs[0])) == n  # every start once per epoch
    assert not np.array_equal(start[:n], start[n:2 * n])  # in a fresh order


def test_periods_are_exact_and_zero_weights_never_drawn():
    assert integer_weights([0.7, 0.2, 0.1])[1] == 10
    counts, period = integer_weights([1 / 3, 1 / 3, 1 / 3])
    assert period == 3 and counts.tolist() == [1, 1, 1]
    counts, period = integer_weights([0.5, 0.0, 0.5])
    assert 1 not in round_robin(counts).tolist()
    counts, period = integer_weights([np.pi, np.e, 1.0])  # no small denominator: rounded to 1/65536
    table = round_robin(counts)
    assert period == 65536 and np.array_equal(np.bincount(table), counts)


def test_the_stream_is_the_same_on_1_2_3_ranks(sources):
    mix = open_mixture(_cfg(sources))
    one, ld = _global_stream(mix, 1, 2, B=12)
    assert torch.equal(one, _global_stream(mix, 1, 12, B=12)[0])
    assert torch.equal(one, _global_stream(mix, 2, 2, B=12)[0])
    assert torch.equal(one, _global_stream(mix, 3, 2, B=12)[0])
    assert torch.equal(one, _global_stream(mix, 3, 4, B=12)[0])
    assert torch.equal(_global_stream(mix, 1, 8, batches=4)[0], _global_stream(mix, 8, 1, batches=4)[0])
    # the tokens counted per source are those of the blocks read
    assert sum(ld.source_metrics()[f"data/{n}/tokens"] for n in mix.names) == 12 * 12 * T


def test_document_alignment_and_masks_work_on_a_mixture(sources, tmp_path):
    mix = open_mixture(_cfg(sources, "math:0.5,code:0.5"))
    with pytest.raises(DataError, match="data.mix source 'code': .*no document index.*data.align=document needs; re-run"):
        old = tmp_path / "code"
        random_dataset(old, 9000, 2000, 1)
        manifest = json.loads((old / "manifest.json").read_text())
        for f in as_version_1(manifest):
            (old / f).unlink()
        (old / "manifest.json").write_text(json.dumps(manifest))
        MixtureBatches(open_mixture(DataConfig(mix=f"math:{sources['math']}:1,code:{old}:1")), T, 8, 8,
                       align="document")
    docs = open_mixture(_cfg(sources, "math:1"))
    one, _ = _global_stream(mix, 1, 2, batches=4, align="document", documents=True)
    assert torch.equal(one, _global_stream(mix, 2, 2, batches=4, align="document", documents=True)[0])
    alone, _ = _global_stream(docs, 1, 8, batches=2, align="document", documents=True)
    tokens, doc = alone[..., :T], alone[..., T + 1:]  # math's tokens change where its documents do
    assert torch.equal(doc[..., 1:] - doc[..., :-1], (tokens[..., 1:] != tokens[..., :-1]).long())


def test_resume_continues_exactly_and_a_changed_mixture_needs_the_override(sources):
    cfg = _cfg(sources, mix_phases="5:code=1")
    mix = open_mixture(cfg)
    full, ld = _global_stream(mix, 1, 4, batches=9)
    first = MixtureBatches(mix, T, 8, 4, seed=5)
    for _ in range(3):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MixtureBatches(mix, T, 8, 2, rank=1, world_size=2, seed=5)  # another world size
    resumed.load_state_dict(state)
    assert resumed.delivered.tolist() == first.delivered.tolist()
    again = MixtureBatches(mix, T, 8, 8, seed=5)
    again.load_state_dict(state)
    rest = torch.stack([torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in again.next()]) for _ in range(6)])
    assert torch.equal(rest, full[3:])  # across the phase switch at position 5
    assert again.source_metrics() == ld.source_metrics()
    other = open_mixture(_cfg(sources, "web:0.5,code:0.3,math:0.2", mix_phases="5:code=1"))
    with pytest.raises(DataError, match="data.mix / data.mix_phases weights differ.*--data.mix_override=true"):
        MixtureBatches(other, T, 8, 8, seed=5).load_state_dict(state)
    changed = MixtureBatches(other, T, 8, 8, seed=5, override=True)
    changed.load_state_dict(state)
    assert changed.schedule.weights_at(2) == pytest.approx([0.7, 0.2, 0.1])
    assert changed.schedule.weights_at(3) == pytest.approx([0.5, 0.3, 0.2])
    later = MixtureBatches(other, T, 8, 8, seed=5)  # resumed again: the recorded history, no override needed
    later.load_state_dict(json.loads(json.dumps(changed.state_dict())))
    assert later.schedule.weights_at(4) == pytest.approx([0.5, 0.3, 0.2])
    assert later.schedule.weights_at(5) == [0.0, 1.0, 0.0]
    renamed = open_mixture(DataConfig(mix=f"web:{sources['web']}:1,prose:{sources['code']}:1"))
    with pytest.raises(DataError, match="checkpoint's data.mix has sources web, code, math"):
        MixtureBatches(renamed, T, 8, 8, seed=5).load_state_dict(state)


@pytest.mark.parametrize("argv, message", [
    (["--data.mix=web:d/web:-0.5,code:d/code:1"], "source 'web': weight '-0.5' must be a number >= 0"),
    (["--data.mix=web:d/web:nan"], "source 'web': weight 'nan' must be"),
    (["--data.mix=web:d/web:,code:d/code:1"], r"source 'web': weight '\(missing\)'"),
    (["--data.mix=web:d/web:0,code:d/code:0"], "every weight is 0"),
    (["--data.mix=web:d/web:1,web:d/code:1"], "source 'web' is named twice"),
    (["--data.mix=web:d/web:1", "--data.path=d/web"], "data.path and data.mix were both given"),
    (["--data.mix=web:d/web:1,code:d/code:1", "--data.mix_phases=900:code=1", "--train.steps=800"],
     "phase from 900 starts at or after train.steps=800"),
    (["--data.mix=web:d/web:1,code:d/code:1", "--data.mix_phases=300:code=1;200:web=1"],
     "the phase from 200 comes after the one from 300"),
    (["--data.mix=web:d/web:1,code:d/code:1", "--data.mix_phases=300:code=0"], r"\(from 300\): every weight is 0"),
    (["--data.mix=web:d/web:1", "--data.mix_phases=300:prose=1"], "names source 'prose', which data.mix does not have"),
])
def test_bad_mixture_options_are_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_mod.parse(argv)
    assert "\n" not in str(e.value)


def test_toml_tables_give_the_same_config(tmp_path):
    toml = tmp_path / "mix.toml"
    toml.write_text('[data.mix.web]\npath = "d/web"\nweight = 0.7\n[data.mix.code]\npath = "d/code"\nweight = 0.3\n'
                    '[[data.mix_phases]]\nfrom = 600\nweb = 0\ncode = 1\n')
    flag = config_mod.parse(["--data.mix=web:d/web:0.7,code:d/code:0.3", "--data.mix_phases=600:web=0,code=1"])
    assert config_mod.parse(["--config", str(toml)]).data == flag.data
    toml.write_text(toml.read_text() + '[data]\npath = "d/other"\n')
    with pytest.raises(ConfigError, match="data.path and data.mix were both given"):
        config_mod.parse(["--config", str(toml)])


def test_bad_sources_name_the_source_and_the_fix(sources, tmp_path):
    with pytest.raises(DataError, match=r"source 'gone': dataset directory .* does not exist; build .*dist-gpt-prepare"):
        open_mixture(DataConfig(mix=f"web:{sources['web']}:1,gone:{tmp_path / 'gone'}:1"))
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"source 'raw': .*manifest.json"):
        open_mixture(DataConfig(mix=f"web:{sources['web']}:1,raw:{tmp_path / 'raw'}:1"))
    chars, tiny, noval = tmp_path / "chars", tmp_path / "tiny", tmp_path / "noval"
    write_dataset(chars, CharTokenizer("\nab"), {"train": [np.zeros(3000, np.uint8)],
                                                                     "val": [np.zeros(300, np.uint8)]})
    with pytest.raises(DataError, match=rf"sources 'web' \({sources['web']}\) and 'chars' \({chars}\) were made with "
                                        rf"different tokenizers.*--tokenizer byte --out {chars} --force"):
        open_mixture(DataConfig(mix=f"web:{sources['web']}:1,chars:{chars}:1"))
    write_dataset(tiny, CharTokenizer("\nab"), {"train": [np.zeros(10, np.uint8)],
                                                                   "val": [np.zeros(300, np.uint8)]})
    with pytest.raises(DataError, match=r"data.mix source 'tiny': the train split .* has no block"):
        MixtureBatches(open_mixture(DataConfig(mix=f"c:{chars}:1,tiny:{tiny}:1")), T, 8, 8)
    write_dataset(noval, CharTokenizer("\nab"), {"train": [np.zeros(3000, np.uint8)], "val": []})
    with pytest.raises(DataError, match=r"data.mix source 'noval' .* has no validation split"):
        open_mixture(DataConfig(mix=f"c:{chars}:1,noval:{noval}:1"))


@pytest.mark.slow
def test_two_ranks_under_fsdp_report_every_source_and_resume_across_a_phase(sources, tmp_path):
    """One real 2-rank run (fsdp) carries every per-source key; a 1-rank run killed before the phase at
    step 5 and resumed gives bitwise the losses of the uninterrupted one."""
    mix = [f"--data.mix=web:{sources['web']}:0.7,code:{sources['code']}:0.2,math:{sources['math']}:0.1",
           "--data.mix_phases=5:code=1", "--train.steps=8", "--eval.interval=4", "--eval.max_blocks=8"]
    fsdp = tmp_path / "fsdp"
    out = run_train([*EXACT, *mix, "--parallel.data=fsdp", "--data.max_epochs=0.01", f"--train.run_dir={fsdp}"], nproc=2)
    assert out.stdout.count("past data.max_epochs=0.01") == 1, out.stdout  # once, by rank 0
    keys = set().union(*(json.loads(line) for line in (fsdp / "metrics.jsonl").read_text().splitlines()))
    for name in ("web", "code", "math"):
        assert {f"val/{name}/loss", f"val/{name}/bpb", f"data/{name}/tokens", f"data/{name}/epochs"} <= keys
    final = json.loads((fsdp / "final.json").read_text())
    expected = MixSchedule([(0, [0.7, 0.2, 0.1]), (5, [0, 1, 0])], 8).drawn_before(8 * 8) * 32
    assert [final["sources"][n]["tokens"] for n in ("web", "code", "math")] == expected.tolist()
    out = run_train(["--run", str(fsdp), "--max-blocks=4", "--quiet", mix[0].replace("--data.mix=", "--mix=")],
                    module="dist_gpt.evaluate")
    assert [line.split(" on ")[1].split(":")[0] for line in out.stdout.splitlines()[:3]] == ["web", "code", "math"]
    assert "weighted val loss" in out.stdout.splitlines()[3]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_train([*EXACT, *mix, f"--train.run_dir={whole}"])
    out = run_train([*EXACT, *mix, "--checkpoint.interval=3", f"--train.run_dir={cut}"],
                    env={"DIST_GPT_FAULT_KILL_AT": "4:0"}, check=False)
    assert out.returncode != 0 and (cut / "checkpoints" / "step_0000003" / "DONE").exists()
    run_train([*EXACT, *mix, "--checkpoint.interval=3", f"--train.run_dir={cut}"])
    assert losses(cut) == losses(whole)
    assert json.loads((cut / "final.json").read_text())["sources"] == json.loads((whole / "final.json").read_text())["sources"]


def test_a_mixture_checkpoint_needs_its_mixture(sources, tmp_path):
    """Resuming a mixture's run on one dataset is one line (the weights' check is in-process above)."""
    run = tmp_path / "run"
    mix = f"--data.mix=web:{sources['web']}:1,code:{sources['code']}:1"
    run_train([*EXACT, mix, "--train.steps=2", "--eval.max_blocks=4", f"--train.run_dir={run}"])
    out = run_train([*EXACT, f"--data.path={sources['web']}", "--train.steps=3", f"--train.run_dir={run}"], check=False)
    assert out.returncode != 0 and "the checkpoint was trained on data.mix=" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_per_source_tags_have_descriptions():
    from dist_gpt.metrics import describe

    assert describe("val/web/loss")[0] == "val/web/loss (nats/token)"
    assert "source code" in describe("data/code/tokens")[1] and "source code" in describe("data/code/epochs")[1]
    assert "bits per byte" in describe("val/web/bpb")[1]
