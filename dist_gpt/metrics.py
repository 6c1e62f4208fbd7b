"""Metrics: TensorBoard scalars, text and hparams, a console line with an ETA, and MFU (section `log`).

Only rank 0 logs: `make_logger(...)` returns a `RunLogger` there and a `QuietLogger` (same
methods, logs nothing) on every other rank, so the training loop never branches on rank.
TensorBoard events go into the run directory itself, so `tensorboard --logdir runs` names each run
by its directory (a run begun by an earlier version keeps its `tensorboard/` subdirectory). Each
scalar carries its unit in its description (and the losses in their display names; tags made at
run time are described by pattern, `SCALAR_PATTERNS`); the HPARAMS
tab compares runs by their validation losses (`HPARAM_METRICS`). Every scalar is also appended
to `<run_dir>/metrics.jsonl` (`{"step": 10, "time": ..., "train/loss": 2.3, ...}` per line; a
resumed run appends, so a step can repeat: the last line for a step wins).

MFU (model FLOPs utilisation) = flops_per_token * tokens_per_s / peak FLOP/s of the devices,
with flops_per_token the training (forward + backward) FLOPs of the model and the peak the dense
tensor-core rate of the device for the run's precision, looked up by device name in `PEAK_TFLOPS`
(or given with `--log.peak_tflops`); "n/a" where unknown, e.g. on CPUs.
"""

from __future__ import annotations

import json
import math
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionStartInfo

from dist_gpt.errors import ConfigError
from dist_gpt.wandb_sink import WandbSink


@dataclass
class LogConfig:
    """Section `log`: what rank 0 reports and how often."""

    interval: int = field(default=10, metadata={"help": "print a console line (and log train scalars) every this many steps"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events into the run directory (tensorboard --logdir runs)"})
    peak_tflops: float | None = field(default=None, metadata={"help": "peak TFLOP/s of one device for MFU; unset = looked up from the GPU's name (n/a if unknown)"})
    wandb: bool = field(default=False, metadata={"help": "also log the same scalars, samples and config to Weights & Biases (pip install 'dist_gpt[wandb]'; WANDB_MODE=offline works without network); the run id is derived from the run directory, so a resumed job continues the same W&B run"})
    wandb_project: str = field(default="dist_gpt", metadata={"help": "the W&B project of log.wandb (WANDB_ENTITY picks the entity)"})

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"log.interval={self.interval} must be >= 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"log.peak_tflops={self.peak_tflops} must be > 0 (or unset)")
        if self.wandb:
            try:
                import wandb  # noqa: F401  (optional: checked here, where the option is, before any rank starts work)
            except ImportError:
                raise ConfigError("log.wandb=true needs the wandb package: pip install 'dist_gpt[wandb]' "
                                  "(or drop --log.wandb)") from None


# Dense (no 2:4 sparsity) peak TFLOP/s per device, from the vendors' datasheets and whitepapers:
# (name pattern, 16-bit tensor rate with fp32 accumulation, bf16 supported, fp32 rate as used by
# matmuls -- TF32 tensor cores on Ampere and later, which precision.py turns on --, full SM count).
# First match wins, so specific names come before the general ones (H100 NVL before H100).
PEAK_TFLOPS: list[tuple[str, float, bool, float, int]] = [
    (r"\bB200\b", 2250.0, True, 1100.0, 148),
    (r"\bH200 NVL\b", 835.0, True, 418.0, 132),
    (r"\bG?H200\b", 989.4, True, 494.7, 132),       # H200 SXM, GH200
    (r"\bH100 NVL\b", 835.0, True, 418.0, 132),
    (r"\bH100\b.*PCIe", 756.0, True, 378.0, 114),
    (r"\bH100\b", 989.4, True, 494.7, 132),         # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bA100\b", 312.0, True, 156.0, 108),         # SXM and PCIe alike
    (r"\bA10G\b", 70.0, True, 35.0, 80),            # AWS part, not in a datasheet: estimate, override if known
    (r"\bA10\b", 125.0, True, 62.5, 72),
    (r"\bA40\b", 149.7, True, 74.8, 84),
    (r"\bL40S\b", 362.0, True, 183.0, 142),
    (r"\bL40\b", 181.0, True, 90.5, 142),
    (r"\bL4\b", 121.0, True, 60.0, 58),
    (r"RTX A6000", 154.8, True, 77.4, 84),
    (r"RTX 4090", 165.2, True, 82.6, 128),          # GeForce: fp32 accumulation runs at half rate
    (r"RTX 3090 Ti", 80.0, True, 40.0, 84),
    (r"RTX 3090", 71.0, True, 35.6, 82),
    (r"V100.*SXM", 125.0, False, 15.7, 80),         # Volta: fp16 tensor cores, no bf16, no TF32
    (r"V100", 112.0, False, 14.0, 80),
    (r"\bT4\b", 65.0, False, 8.1, 40),
    (r"MI300X", 1307.4, True, 653.7, 304),
]


def peak_flops_for_name(name: str, dtype_name: str, sm_count: int | None = None) -> float | None:
    """Peak FLOP/s of the device called `name` for `dtype_name` (fp32 | bf16 | fp16), or None.
    A MIG slice ("... MIG 3g.40gb") gets the share of the peak its `sm_count` SMs provide."""
    for pattern, half, has_bf16, fp32, full_sms in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype_name == "bf16" and not has_bf16:
                return None
            tflops = fp32 if dtype_name == "fp32" else half
            if "MIG" in name:
                if not sm_count:
                    return None
                tflops *= min(1.0, sm_count / full_sms)
            return tflops * 1e12
    return None


def device_peak_flops(device: torch.device | str, dtype_name: str) -> float | None:
    """Peak FLOP/s of one `device` for the precision `dtype_name`; None ("n/a") off CUDA or when the
    GPU is not in the table."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return peak_flops_for_name(props.name, dtype_name, props.multi_processor_count)


def resolve_peak_flops(cfg: LogConfig, device: torch.device | str, dtype_name: str) -> float | None:
    """`log.peak_tflops` if set, else the table's value for this device."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    return device_peak_flops(device, dtype_name)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: `tokens_per_s` summed over `num_devices` devices, each
    with `peak_flops`. None when the peak is unknown."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * num_devices)


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak memory of this process in GiB: allocated tensors on CUDA, resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return None


@dataclass(frozen=True)
class Throughput:
    """The per-run constants that turn a step's time into tokens/s and MFU, fixed when the run is built."""

    tokens_per_step: int                 # summed over every rank
    flops_per_token: float               # training (forward + backward) FLOPs of the model
    peak_flops: float | None             # of one device at the run's precision; None: MFU n/a
    num_devices: int = 1                 # the world size
    device: str = "cpu"                  # where peak memory is read

    @classmethod
    def of(cls, cfg: LogConfig, env, dtype_name: str, tokens_per_step: int, flops_per_token: float) -> "Throughput":
        return cls(tokens_per_step, flops_per_token, resolve_peak_flops(cfg, env.device, dtype_name),
                   env.world_size, str(env.device))

    def mfu(self, tokens_per_s: float) -> float | None:
        return mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.num_devices)


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m'; 192 -> '3m12s'; 45 -> '45s'."""
    s = max(0, int(round(seconds)))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_value(value) -> str:
    """Short, readable numbers for the console: 2.3412, 6.00e-04, 12.3k, n/a."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int) and abs(value) < 100_000:
        return str(value)
    value = float(value)
    if not math.isfinite(value) or value == 0:
        return str(value if value else 0)
    if abs(value) >= 1e4:  # 12.3k, 1.5M; below 10k four digits read fine (1234)
        scale, suffix = next((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(value) >= s)
        return f"{value / scale:.3g}{suffix}"
    return f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4g}"


def format_params(model) -> str:
    """'12.13M parameters (11.60M without embeddings)': every parameter (a shared one once), and those
    outside the lookup tables that the FLOP count uses -- what the start-up line and --dry-run print."""
    total, matmul = model.num_params(non_embedding=False), model.num_params()
    return f"{total / 1e6:.2f}M parameters ({matmul / 1e6:.2f}M without embeddings)"


# What each scalar is and its unit: TensorBoard shows the description beside the chart, and the losses'
# units in their display names. The tags themselves are those of metrics.jsonl.
SCALARS: dict[str, tuple[str, str]] = {
    "train/loss": ("train/loss (nats/token)", "mean cross-entropy of the logged step's global batch, in nats per token"),
    "val/loss": ("val/loss (nats/token)", "mean cross-entropy over the validation blocks, in nats per token"),
    "val/best_loss": ("val/best_loss (nats/token)", "the lowest val/loss so far, in nats per token"),
    "val/bpb": ("val/bpb (bits/byte)", "val/loss / ln 2 / (source bytes per token): bits per byte of the text"),
    "train/lr": ("train/lr", "learning rate of the first parameter group at this step"),
    "train/grad_norm": ("train/grad_norm", "global L2 norm of the gradients before clipping"),
    "perf/tokens_per_s": ("perf/tokens_per_s", "training tokens per second, summed over every rank"),
    "perf/mfu": ("perf/mfu", "model FLOPs utilisation: achieved / peak FLOP/s of the devices (0 to 1)"),
    "perf/step_time_ms": ("perf/step_time_ms", "milliseconds of the logged step"),
    "perf/data_wait_share": ("perf/data_wait_share", "share of the step spent waiting for data (0 to 1)"),
    "perf/peak_mem_gib": ("perf/peak_mem_gib", "peak memory of rank 0 in GiB (CUDA: allocated tensors; CPU: resident set)"),
    "ranks/compute_ms_median": ("ranks/compute_ms_median", "median over the ranks of each rank's compute ms per step over the log interval (CPU: its training thread's CPU time; CUDA: its forward's GPU time; collective waits excluded)"),
    "ranks/compute_ms_max": ("ranks/compute_ms_max", "the slowest rank's compute ms per step over the log interval"),
    "ranks/slowest": ("ranks/slowest", "the rank id with the largest compute time over the log interval"),
    "train/spikes": ("train/spikes", "loss spikes detected so far (train.spike_policy): steps whose loss or gradient norm z-score reached train.spike_z"),
    "train/spike_loss_z": ("train/spike_loss_z", "z-score of a spike step's loss against the last train.spike_window accepted steps"),
    "train/spike_grad_norm_z": ("train/spike_grad_norm_z", "z-score of a spike step's gradient norm against the last train.spike_window accepted steps"),
    "perf/data_wait_share_max": ("perf/data_wait_share_max", "the largest share of the log interval any rank spent waiting for data (0 to 1)"),
}
# Tags made at run time, described by pattern (first match wins): (regex, display name, description),
# formatted with the pattern's named groups. The display names of losses carry their units.
SCALAR_PATTERNS: list[tuple[str, str, str]] = [
    (r"val/(?P<name>[^/]+)/acc", "{tag}", "accuracy on the multiple-choice task {name} (0 to 1): share of items "
     "whose most likely ending (summed log-likelihood) is the right one"),
    (r"val/(?P<name>[^/]+)/acc_norm", "{tag}", "accuracy on the multiple-choice task {name} (0 to 1), each "
     "ending's log-likelihood divided by its length in characters"),
    (r"val/(?P<name>[^/]+)/loss", "{tag} (nats/token)", "mean cross-entropy over the validation blocks of "
     "source {name} (eval.max_blocks of them), in nats per token"),
    (r"val/(?P<name>[^/]+)/bpb", "{tag} (bits/byte)", "bits per byte of {name}'s validation text"),
    (r"data/(?P<name>[^/]+)/tokens", "{tag}", "training tokens read from source {name} so far (counted from "
     "the blocks sampled)"),
    (r"data/(?P<name>[^/]+)/epochs", "{tag}", "passes over source {name}'s training blocks so far"),
    (r"ranks/(?P<what>.+)_ms_(?P<stat>max|min|mean)", "{tag} (ms)", "the {stat} over the ranks of each "
     "rank's {what} time in the logged step, in milliseconds"),
    (r"hparam/(?P<name>.+)", "{tag}", "{name}: a result of the run, compared across runs in the HPARAMS tab"),
]


def describe(tag: str) -> tuple[str, str]:
    """(display name, description) of a scalar tag: from SCALARS, else SCALAR_PATTERNS, else a note
    that it has none (never the tag itself)."""
    if tag in SCALARS:
        return SCALARS[tag]
    for pattern, display, description in SCALAR_PATTERNS:
        if match := re.fullmatch(pattern, tag):
            return display.format(tag=tag, **match.groupdict()), description.format(**match.groupdict())
    return tag, "a scalar without a description yet: add one to SCALAR_PATTERNS in dist_gpt/metrics.py"


# The metrics the HPARAMS tab compares runs by; it shows each one's last value, so val/loss is the
# final validation loss of a finished run.
HPARAM_METRICS = ("val/loss", "val/best_loss", "val/bpb")


def tensorboard_dir(run_dir: str | Path) -> Path:
    """Where a run's events go: the run directory, or the `tensorboard/` an earlier version made there."""
    old = Path(run_dir) / "tensorboard"
    return old if old.is_dir() else Path(run_dir)


def _plugin_summary(tag: str, plugin: str, content: bytes, display_name: str = "", description: str = ""):
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=plugin, content=content),
                           display_name=display_name, summary_description=description)
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def hparams_summaries(hparams: dict, metric_tags) -> list:
    """The HPARAMS plugin's experiment (each hparam with its type, booleans as booleans; each metric
    with its description) and this run's session start, as summaries for the run's own event file."""
    start = SessionStartInfo(start_time_secs=time.time())
    infos = []
    for name, value in hparams.items():
        if isinstance(value, bool):  # before int: a bool is an int to Python
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[name].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=describe(tag)[0],
                                  description=describe(tag)[1],
                                  dataset_type=api_pb2.DATASET_VALIDATION if tag.startswith("val/") else api_pb2.DATASET_UNKNOWN)
               for tag in metric_tags]
    experiment = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION,
                                   experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))
    session = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, session_start_info=start)
    return [_plugin_summary(metadata.EXPERIMENT_TAG, metadata.PLUGIN_NAME, experiment.SerializeToString()),
            _plugin_summary(metadata.SESSION_START_INFO_TAG, metadata.PLUGIN_NAME, session.SerializeToString())]


def _flatten(config: dict, prefix: str = "") -> dict:
    """{'model': {'n_layer': 4}} -> {'model.n_layer': 4}; values TensorBoard's hparams accept."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None and anything else: shown as text
            flat[name] = str(value)
    return flat


def _rank_fields(ranks: dict | None, world_size: int) -> dict:
    """The console's view of the ranks (several ranks only): `compute 10.2/14.9ms r3 | data max 2%`, the
    median and slowest rank's compute ms per step, then the largest data-wait share of any rank."""
    if not ranks or world_size < 2:
        return {}
    return {"compute": f"{ranks['ranks/compute_ms_median']:.1f}/{ranks['ranks/compute_ms_max']:.1f}ms "
                       f"r{ranks['ranks/slowest']}",
            "data max": f"{100 * ranks['perf/data_wait_share_max']:.0f}%"}


@dataclass
class StepReport:
    """What a logged step reports (RunLogger.step)."""

    loss: float
    lr: float
    grad_norm: float
    step_time: float           # seconds of this step
    data_time: float           # seconds of it spent waiting for data
    ranks: dict | None = None  # every rank's compute time and data wait over the interval (training/stragglers.py)


class QuietLogger:
    """A logger that logs nothing: what ranks other than 0 (and the benchmarks) get. Every method of
    RunLogger, doing nothing -- except `due`, which answers the same on every rank because callers
    may run a collective when it is True."""

    is_main = False
    tb_dir: Path | None = None

    def __init__(self, cfg: LogConfig | None = None, total_steps: int = 0, throughput: Throughput | None = None):
        self.cfg, self.total_steps = cfg or LogConfig(), total_steps
        self.throughput = throughput or Throughput(1, 0.0, None)

    def due(self, step: int) -> bool:
        """Whether `step` (optimizer steps done) gets a log line: the first, every `log.interval`-th
        and the last."""
        return step == 1 or step % self.cfg.interval == 0 or step == self.total_steps

    def step(self, step: int, report: StepReport) -> None: ...
    def eval(self, step: int, *, loss: float, bpb: float, blocks: int, best: float, sources: dict | None = None) -> None: ...
    def scalars(self, step: int, values: dict) -> None: ...
    def console(self, step: int, values: dict) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def event(self, step: int, name: str, fields: dict) -> None: ...
    def hparams(self, config: dict, metrics: dict | None = None) -> None: ...
    def print(self, msg: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class RunLogger(QuietLogger):
    """Rank 0's logger of the run: TensorBoard events in the run directory, every scalar also appended
    to <run_dir>/metrics.jsonl (one JSON object per call, for scripts), console lines on stdout."""

    is_main = True

    def __init__(self, run_dir: str | Path, cfg: LogConfig, total_steps: int, throughput: Throughput | None = None):
        super().__init__(cfg, total_steps, throughput)
        self.writer = None
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.tb_dir = tensorboard_dir(run_dir) if cfg.tensorboard else None
        if self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # start-up cost: ~0.7 s, only where used

            # flush every 10 s so `tensorboard --logdir` shows a short CPU run while it trains
            self.writer = SummaryWriter(log_dir=str(self.tb_dir), flush_secs=10)
        self.wandb = None
        if cfg.wandb:
            self.wandb = WandbSink(run_dir, cfg.wandb_project)
        self._eta_origin: tuple[float, int] | None = None  # (time, step) of the first console line
        self._last_step = 0  # hparams metrics are logged at the latest step seen
        self._described: set[str] = set()  # scalar tags written with their description

    def step(self, step: int, report: StepReport) -> None:
        """The training scalars and console line of one logged step; tokens/s counts every rank's tokens."""
        loss, lr, grad_norm, step_time, data_time, ranks = (report.loss, report.lr, report.grad_norm,
                                                            report.step_time, report.data_time, report.ranks)
        tokens_per_s = self.throughput.tokens_per_step / step_time if step_time > 0 else 0.0
        util = self.throughput.mfu(tokens_per_s)
        mem = peak_memory_gib(self.throughput.device)
        self.scalars(step, {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "perf/tokens_per_s": tokens_per_s, "perf/mfu": util, "perf/step_time_ms": 1000 * step_time,
            "perf/data_wait_share": data_time / step_time if step_time > 0 else None, "perf/peak_mem_gib": mem,
            **(ranks or {}),
        })
        self.console(step, {
            "loss": f"{loss:.4f}", "lr": lr, "gnorm": grad_norm, "tok/s": tokens_per_s,
            "mfu": None if util is None else f"{100 * util:.1f}%", "ms/step": 1000 * step_time,
            "data": f"{100 * data_time / step_time:.0f}%" if step_time > 0 else None,
            "mem": None if mem is None else f"{mem:.2f}GiB",
            **_rank_fields(ranks, self.throughput.num_devices),
        })

    def eval(self, step: int, *, loss: float, bpb: float, blocks: int, best: float, sources: dict | None = None) -> None:
        """A validation result: scalars val/loss (nats per token), val/bpb, val/best_loss (`best`, the
        run's lowest so far, this one included) and a line; with a mixture's `sources` ({name: {loss,
        bpb, blocks}}) also val/<name>/loss and val/<name>/bpb, and a line per source."""
        values = {"val/loss": loss, "val/bpb": bpb, "val/best_loss": best}
        for name, r in (sources or {}).items():
            values.update({f"val/{name}/loss": r["loss"], f"val/{name}/bpb": r["bpb"]})
        self.scalars(step, values)
        best = " (best)" if loss == best else f" (best {best:.4f})"
        self.print(f"eval step {step}/{self.total_steps} | val loss {loss:.4f} nats/token | {bpb:.4f} bits/byte"
                   f"{best} | {blocks} blocks")
        for name, r in (sources or {}).items():
            self.print(f"  {name}: val loss {r['loss']:.4f} nats/token | {r['bpb']:.4f} bits/byte | {r['blocks']} blocks")

    def scalars(self, step: int, values: dict) -> None:
        """One TensorBoard scalar per entry ('train/loss': 2.3); None (e.g. MFU n/a) is skipped."""
        self._last_step = max(self._last_step, step)
        values = {tag: float(v) for tag, v in values.items() if v is not None}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for tag, value in values.items():
                self._add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.scalars(step, values)

    def _add_scalar(self, tag: str, value: float, step: int) -> None:
        """A scalar. The first of each tag is preceded by the same point as a tensor summary carrying
        its display name and description (`describe`): TensorBoard keeps a tag's first metadata, and
        its fast loader (the default) drops the metadata of plain `simple_value` scalars. The points
        themselves stay `simple_value`s, as SummaryWriter writes them."""
        if tag not in self._described:
            self._described.add(tag)
            summary = _plugin_summary(tag, "scalars", b"", *describe(tag))
            summary.value[0].metadata.data_class = DATA_CLASS_SCALAR
            summary.value[0].tensor.CopyFrom(TensorProto(dtype=DT_FLOAT, float_val=[value]))
            self.writer.file_writer.add_summary(summary, step)
        self.writer.add_scalar(tag, value, step)

    def console(self, step: int, values: dict) -> None:
        """`step 120/2000 | loss 2.341 | lr 6.00e-04 | ... | eta 3m12s`, with `step` the number of
        optimizer steps done (1 .. total_steps). The ETA extrapolates the mean time per step since
        the first console line (so start-up and compilation do not count)."""
        self._last_step = max(self._last_step, step)
        now = time.perf_counter()
        if self._eta_origin is None:
            self._eta_origin = (now, step)
        t0, s0 = self._eta_origin
        eta = format_duration((now - t0) / (step - s0) * (self.total_steps - step)) if step > s0 else "--"
        fields = [f"step {step}/{self.total_steps}"] + [f"{k} {format_value(v)}" for k, v in values.items()]
        print(" | ".join(fields + [f"eta {eta}"]), flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        """Text under `tag`, e.g. a sample. Indented four spaces so TensorBoard's Markdown renders it
        as a code block, keeping newlines and spacing (the stored string carries the indent)."""
        if self.writer is not None:
            self.writer.add_text(tag, "\n".join("    " + line for line in text.split("\n")), step)
        if self.wandb is not None:
            self.wandb.text(step, tag, text)

    def event(self, step: int, name: str, fields: dict) -> None:
        """An event (a loss spike) as one line of metrics.jsonl: {"step", "time", "event": name, **fields}.
        Its scalars (e.g. train/spikes) are logged apart, by `scalars`."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "event": name, **fields}) + "\n")

    def hparams(self, config: dict, metrics: dict | None = None) -> None:
        """The run's (nested) config as hparams, against the metrics the HPARAMS tab compares runs by:
        `HPARAM_METRICS` (logged by `eval`) and `metrics` ({'hparam/x': 1.4}), logged now. Written into
        this run's own event file."""
        metrics = metrics or {}
        if self.wandb is not None:
            self.wandb.config(config)
        if self.writer is None:
            return
        for summary in hparams_summaries(_flatten(config), [*HPARAM_METRICS, *metrics]):
            self.writer.file_writer.add_summary(summary)
        if metrics:
            self.scalars(self._last_step, metrics)

    def print(self, msg: str) -> None:
        print(msg, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def make_logger(run_dir: str | Path, cfg: LogConfig, is_main: bool, total_steps: int,
                throughput: Throughput | None = None) -> RunLogger | QuietLogger:
    """RunLogger on rank 0, QuietLogger elsewhere."""
    if is_main:
        return RunLogger(run_dir, cfg, total_steps, throughput)
    return QuietLogger(cfg, total_steps, throughput)
