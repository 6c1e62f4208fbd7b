"""Precision resolution (auto per device), autocast dtypes, and the fp16 GradScaler vs the no-op one."""

import copy
import os

import pytest
import torch
from torch import nn

from dist_gpt.errors import ConfigError
from dist_gpt.parallel.precision import Precision, cpu_has_native_bf16, resolve_precision


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_cpu_bf16_detection_reads_cpuinfo_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))
    assert not cpu_has_native_bf16(tmp_path / "missing")  # no /proc (macOS): no claim


def test_auto_on_this_cpu_follows_its_flags():
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = "avx512_bf16" in text or "amx_bf16" in text or "AMX" in torch.backends.cpu.get_cpu_capability()
    assert cpu_has_native_bf16() == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_auto_without_native_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr("dist_gpt.parallel.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", "meta") == "fp32"  # any non-CUDA, non-bf16 device


def test_explicit_names_and_a_bad_one():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, "cpu") == name
    with pytest.raises(ConfigError, match="train.precision='half'"):
        resolve_precision("half", "cpu")


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_dtype(name, dtype):
    prec = Precision(name, "cpu")
    assert prec.dtype == dtype
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with prec.autocast():
        y = layer(x)
    assert y.dtype == dtype
    assert layer.weight.dtype == torch.float32  # weights stay fp32
    assert torch.allclose(y.float(), layer(x), atol=3e-2)


def _step(prec, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with prec.autocast():  # small inputs: scaled fp16 grads (65536x) stay finite
        loss = model(torch.randn(16, 8) * 0.1).float().square().mean()  # fp32 loss, like cross_entropy
    prec.scaler.scale(loss).backward()
    prec.scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    prec.scaler.step(opt)
    prec.scaler.update()
    return model, grads


def test_noop_scaler_is_a_plain_step():
    prec = Precision("bf16", "cpu")
    assert not prec.scaler.is_enabled()
    loss = torch.tensor(3.0)
    assert prec.scaler.scale(loss) is loss
    model, _ = _step(prec)

    torch.manual_seed(0)
    ref = nn.Linear(8, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ref(torch.randn(16, 8) * 0.1).float().square().mean()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert prec.state_dict() == {"precision": "bf16", "scaler": {}}


def test_fp16_scaler_unscales_and_round_trips():
    prec = Precision("fp16", "cpu")
    assert prec.scaler.is_enabled()
    _, grads = _step(prec)
    ref_grads = _step(Precision("fp32", "cpu"))[1]
    for g, r in zip(grads, ref_grads):  # unscale_ leaves true gradients (fp16 forward: loose match)
        assert torch.allclose(g, r, rtol=2e-2, atol=2e-3)

    assert prec.scaler.get_scale() == 65536.0  # finite grads: no back-off
    prec.scaler.update(1024.0)
    state = copy.deepcopy(prec.state_dict())
    fresh = Precision("fp16", "cpu")
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == 1024.0

    Precision("fp16", "cpu").load_state_dict(Precision("bf16", "cpu").state_dict())  # precision changed: fresh scale
    Precision("bf16", "cpu").load_state_dict(state)


def test_fp16_overflow_skips_the_step_and_backs_off():
    prec = Precision("fp16", "cpu")
    model, _ = _step(prec)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec.scaler.update(2.0 ** 30)
    with prec.autocast():
        loss = model(torch.full((16, 8), 100.0)).square().mean()
    prec.scaler.scale(loss).backward()  # 2^30 x grads overflow float16
    prec.scaler.step(opt)
    prec.scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert prec.scaler.get_scale() == 2.0 ** 29


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_is_bf16_with_tf32():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", "cuda") == expected
    Precision("fp32", "cuda")
    assert torch.get_float32_matmul_precision() == "high"
