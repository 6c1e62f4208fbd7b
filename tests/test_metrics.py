"""Metrics logger: TensorBoard events read back with TensorBoard's own reader, the console line and
its ETA, the quiet non-main ranks, the MFU peak table."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import dist_gpt.metrics as metrics
from dist_gpt.errors import ConfigError
from dist_gpt.parallel.dist import DistEnv
from dist_gpt.metrics import (LogConfig, QuietLogger, RunLogger, Throughput, device_peak_flops, format_duration,
                              StepReport, describe, format_params, format_value, make_logger, mfu, peak_flops_for_name, resolve_peak_flops)


def _events(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_text_and_hparams_read_back(tmp_path):
    log = make_logger(tmp_path, LogConfig(), is_main=True, total_steps=20)
    for step in (10, 20):
        log.scalars(step, {"train/loss": 5.0 / step, "train/lr": 1e-3, "perf/mfu": None})
    log.text(20, "sample", "def f(x):\n    return x")
    log.hparams({"model": {"n_layer": 4, "norm": "rmsnorm", "head_dim": None, "bias": True}, "optim": {"lr": 6e-4}},
                {"hparam/val_loss": 1.25})
    log.close()

    acc = _events(tmp_path)  # events go into the run directory itself
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(10, 0.5), (20, 0.25)]
    assert "perf/mfu" not in acc.Tags()["scalars"]  # n/a values are skipped, not logged as 0
    assert [e.value for e in acc.Scalars("hparam/val_loss")] == [1.25]
    assert acc.Scalars("hparam/val_loss")[0].step == 20

    (sample,) = acc.Tensors("sample/text_summary")
    assert sample.step == 20
    assert sample.tensor_proto.string_val[0].decode() == "    def f(x):\n        return x"

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.n_layer"].number_value == 4 and hparams["model.bias"].bool_value is True
    assert hparams["model.norm"].string_value == "rmsnorm"
    assert hparams["model.head_dim"].string_value == "None"
    assert hparams["optim.lr"].number_value == pytest.approx(6e-4)


def test_non_main_ranks_stay_quiet(tmp_path, capsys):
    log = make_logger(tmp_path, LogConfig(), is_main=False, total_steps=10)
    assert isinstance(log, QuietLogger) and not isinstance(log, RunLogger)
    log.scalars(1, {"train/loss": 1.0})
    log.console(1, {"loss": 1.0})
    log.text(1, "sample", "hi")
    log.hparams({"a": 1}, {"m": 1.0})
    log.print("hello")
    log.close()
    log.step(1, StepReport(loss=1.0, lr=1e-3, grad_norm=1.0, step_time=0.1, data_time=0.0))
    log.eval(1, loss=1.0, bpb=1.0, blocks=1, best=1.0)
    assert capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_off_keeps_only_the_jsonl(tmp_path, capsys):
    log = make_logger(tmp_path / "run", LogConfig(tensorboard=False), is_main=True, total_steps=10)
    log.scalars(1, {"train/loss": 1.0, "perf/mfu": None})
    log.scalars(2, {"train/loss": 0.5})
    log.print("done")
    log.close()
    assert capsys.readouterr().out == "done\n"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in lines] == [(1, 1.0), (2, 0.5)]
    assert "perf/mfu" not in lines[0]


def test_due_is_the_same_on_every_rank(tmp_path):
    cfg = LogConfig(interval=10, tensorboard=False)
    main = make_logger(tmp_path, cfg, is_main=True, total_steps=25)
    other = make_logger(tmp_path, cfg, is_main=False, total_steps=25)
    due = [s for s in range(1, 26) if main.due(s)]
    assert due == [1, 10, 20, 25] == [s for s in range(1, 26) if other.due(s)]
    assert main.is_main and not other.is_main


def test_step_and_eval(tmp_path, capsys):
    cfg = LogConfig(peak_tflops=1.0)
    # 1e6 FLOPs/token x 1e6 tokens/s (2e5 tokens in 0.2 s) over 2 devices of 1 TFLOP/s: MFU 0.5
    throughput = Throughput.of(cfg, DistEnv(world_size=2), "fp32", tokens_per_step=200_000, flops_per_token=1e6)
    log = make_logger(tmp_path, cfg, is_main=True, total_steps=100, throughput=throughput)
    log.step(10, StepReport(loss=2.5, lr=3e-4, grad_norm=0.75, step_time=0.2, data_time=0.05))
    log.eval(10, loss=1.5, bpb=2.0, blocks=64, best=1.5)
    log.eval(20, loss=1.75, bpb=2.3, blocks=64, best=1.5)
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 10/100 | loss 2.5000 | lr 3.00e-04 | gnorm 0.75 | tok/s 1M | mfu 50.0% | "
                             "ms/step 200 | data 25% | mem ")
    assert out[1:] == ["eval step 10/100 | val loss 1.5000 nats/token | 2.0000 bits/byte (best) | 64 blocks",
                       "eval step 20/100 | val loss 1.7500 nats/token | 2.3000 bits/byte (best 1.5000) | 64 blocks"]
    acc = _events(tmp_path)
    assert acc.Scalars("perf/mfu")[0].value == pytest.approx(0.5)
    assert acc.Scalars("perf/data_wait_share")[0].value == pytest.approx(0.25)
    assert acc.Scalars("perf/peak_mem_gib")[0].value > 0  # CPU: the process's peak resident set
    assert [e.value for e in acc.Scalars("val/best_loss")] == [1.5, 1.5]
    assert [e.value for e in acc.Scalars("val/bpb")] == pytest.approx([2.0, 2.3])


def test_console_line_with_eta(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    log = make_logger(tmp_path, LogConfig(tensorboard=False), is_main=True, total_steps=100)
    log.console(10, {"loss": 2.34567, "lr": 6e-4, "tok/s": 12345.6, "mfu": None})
    log.console(20, {"loss": 2.1})  # 1 s per step, 80 steps to go
    first, second = capsys.readouterr().out.splitlines()
    assert first == "step 10/100 | loss 2.346 | lr 6.00e-04 | tok/s 12.3k | mfu n/a | eta --"
    assert second == "step 20/100 | loss 2.1 | eta 1m20s"


def test_formatting():
    assert [format_value(v) for v in (2.34567, 6e-4, 1234.5, 12345.6, 1e6, 3.2e7, 7, 250_000, None, True, 0.0)] == [
        "2.346", "6.00e-04", "1234", "12.3k", "1M", "32M", "7", "250k", "n/a", "True", "0"]
    assert [format_duration(s) for s in (45, 192, 3725, 2 * 86400 + 3 * 3600)] == ["45s", "3m12s", "1h02m", "2d03h"]


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "fp32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 156.0),
    ("NVIDIA A10G", "bf16", 70.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA GeForce RTX 3090", "fp16", 71.0),
    ("NVIDIA GeForce RTX 3090 Ti", "fp16", 80.0),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp32", 14.0),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # Volta has no bf16
    ("Tesla T4", "fp16", 65.0),
    ("Some Future GPU", "bf16", None),
])
def test_peak_table(name, dtype, tflops):
    peak = peak_flops_for_name(name, dtype)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_mig_slice_gets_its_share_of_the_peak():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "bf16", sm_count=66) == pytest.approx(494.7e12)
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "bf16") is None


def test_peak_override_and_mfu():
    assert device_peak_flops("cpu", "bf16") is None
    assert resolve_peak_flops(LogConfig(), "cpu", "fp32") is None
    assert resolve_peak_flops(LogConfig(peak_tflops=2.5), "cpu", "fp32") == 2.5e12
    # 1e9 FLOPs/token at 100k tokens/s on 2 devices of 100 TFLOP/s each: 1e14 / 2e14
    assert mfu(1e9, 1e5, 100e12, num_devices=2) == pytest.approx(0.5)
    assert mfu(1e9, 1e5, None) is None


@pytest.mark.parametrize("kwargs,key", [({"interval": 0}, "log.interval"), ({"peak_tflops": 0.0}, "log.peak_tflops")])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LogConfig(**kwargs)


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_tensorboard_shows_runs_by_name_units_and_hparams_metrics(tmp_path):
    """What a user sees with `tensorboard --logdir runs`, asked of TensorBoard's own data endpoints: each
    run named by its directory (an earlier version's tensorboard/ subdirectory kept readable), the
    losses' units, booleans as booleans, and the HPARAMS tab comparing runs by validation loss."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    (runs / "old" / "tensorboard").mkdir(parents=True)  # a run begun by an earlier version
    for name, lr, final_loss in (("a", 1e-3, 1.5), ("b", 2e-3, 1.25), ("old", 3e-3, 1.75)):
        log = make_logger(runs / name, LogConfig(), is_main=True, total_steps=20)
        log.hparams({"optim": {"lr": lr}, "train": {"compile": name == "a"}})
        log.scalars(10, {"train/loss": 2.0})
        log.eval(10, loss=final_loss + 0.5, bpb=2.0, blocks=4, best=final_loss + 0.5)
        log.eval(20, loss=final_loss, bpb=1.5, blocks=4, best=final_loss)
        log.close()
    assert list((runs / "old").glob("events.*")) == [] and list((runs / "old" / "tensorboard").glob("events.*"))

    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
                               "--port", "0", "--load_fast=false", "--reload_task=blocking", "--reload_interval=0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:  # the data is loaded before it serves (blocking reload); it names its port
            if line.startswith("TensorBoard ") and " at http://" in line:
                base = line.split(" at ", 1)[1].split()[0].rstrip("/")
                break
        else:
            raise AssertionError(f"tensorboard ended without serving (exit {server.wait()})")
        assert sorted(_get(f"{base}/data/runs")) == ["a", "b", "old/tensorboard"]
        tags = _get(f"{base}/data/plugin/scalars/tags")
        assert tags["a"]["val/loss"]["displayName"] == "val/loss (nats/token)"
        assert "nats per token" in tags["b"]["train/loss"]["description"]
        experiment = _post(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {"val/loss", "val/best_loss", "val/bpb"}
        types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
        assert types == {"optim.lr": "DATA_TYPE_FLOAT64", "train.compile": "DATA_TYPE_BOOL"}
        groups = _post(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "val/loss"}, "order": "ORDER_ASC"}], "startIndex": 0, "sliceSize": 10})
        table = {g["name"]: ({v["name"]["tag"]: v["value"] for v in g["metricValues"]}, g["hparams"])
                 for g in groups["sessionGroups"]}
        assert table["a"][0]["val/loss"] == 1.5 and table["b"][0]["val/best_loss"] == 1.25  # final, best
        assert table["a"][1]["train.compile"] is True and table["b"][1]["train.compile"] is False
        assert [g["name"] for g in groups["sessionGroups"]] == ["b", "a", "old/tensorboard"]  # by val loss
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_run_time_tags_are_described_by_pattern():
    """Tags made at run time get a description from SCALAR_PATTERNS, never their own name."""
    for tag, words in (("val/hellaswag/acc", "hellaswag"), ("val/hellaswag/acc_norm", "length"),
                       ("hparam/val_loss", "HPARAMS"), ("val/web/loss", "nats per token"),
                       ("data/web/tokens", "source web"), ("ranks/wait_ms_max", "max over the ranks"),
                       ("something/new", "SCALAR_PATTERNS")):
        display, description = describe(tag)
        assert words in description and description != tag and display.startswith(tag), (tag, description)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_scalar_of_a_run_has_a_description_in_tensorboard(tiny_data, tmp_path):
    """A run with eval.tasks on, asked of TensorBoard's own /data/plugin/scalars/tags endpoint with
    tensorboard's default (fast, Rust) loader, which drops the metadata of plain simple_value scalars:
    every tag has a non-empty description that is not the tag itself."""
    import subprocess
    import sys
    import urllib.error

    from conftest import ASSETS, run_train

    run = tmp_path / "runs" / "r"
    run_train(["--preset", "debug", f"--data.path={tiny_data}", f"--train.run_dir={run}", "--train.steps=2",
               "--model.block_size=256", "--eval.max_blocks=2", "--train.global_batch=2", "--train.micro_batch=2",
               "--log.interval=1", "--eval.interval=2", f"--eval.tasks={ASSETS / 'mc_task' / 'mc_task.jsonl'}",
               "--eval.sample_tokens=0", "--checkpoint.interval=0"])
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tags = {}
        for _ in range(120):  # until it serves and has read the run (bounded; each wait also sees an exit)
            try:
                tags = _get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags").get("r", {})
            except (urllib.error.URLError, ConnectionError):
                pass
            if "val/mc_task/acc_norm" in tags and "train/loss" in tags:
                break
            try:
                raise AssertionError(f"tensorboard ended (exit {server.wait(timeout=1)})")
            except subprocess.TimeoutExpired:
                pass
        assert {"train/loss", "val/loss", "val/mc_task/acc", "val/mc_task/acc_norm", "perf/tokens_per_s"} <= set(tags)
        for tag, meta in tags.items():
            assert meta["description"] and meta["description"] != f"<p>{tag}</p>", (tag, meta)
            assert meta["displayName"], (tag, meta)
        assert tags["val/loss"]["displayName"] == "val/loss (nats/token)"
        assert "mc_task" in tags["val/mc_task/acc"]["description"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_parameter_count_says_what_it_counts():
    """An untied model (an imported Llama's layout): the start-up line gives every parameter, and
    separately those without the embedding tables -- not the latter alone (was 11.60M of 12,128,768)."""
    from dist_gpt import config
    from dist_gpt.model.gpt import GPT

    cfg = config.build("debug", overrides={"model.tie_embeddings": False, "model.vocab_size": 256})
    model = GPT(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    table = model.tok_emb.weight.numel()
    assert format_params(model) == f"{total / 1e6:.2f}M parameters ({(total - table) / 1e6:.2f}M without embeddings)"
