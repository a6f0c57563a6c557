"""ggml's CPU row kernels through leank (kernels/ggml_cpu.py, kernels/ggml_matmul.c) against the float32
path, on random blocks of every type; and the clean fall-back to leank's own C kernels."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from leank.kernels import cpu, ggml_cpu

needs_ggml = pytest.mark.skipif(not ggml_cpu.available(), reason=f"ggml unavailable: {ggml_cpu.unavailable_reason()}")

TYPE_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
# the activation type ggml pairs each weight type with, and the bytes of its blocks' float16 fields
HALVES = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208]}


def random_blocks(type_name: str, rows: int, k: int, seed: int):
    """Random blocks (every byte random, the float16 scales set to sane positive values) and their
    float32 decoding by gguf-py."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    qt = Q[type_name]
    bs, tb = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // bs * tb), dtype=np.uint8)
    blk = raw.reshape(rows, k // bs, tb)
    for off in HALVES[type_name]:
        h = (rng.random((rows, k // bs)) * 0.02 + 0.001).astype(np.float16)
        blk[:, :, off : off + 2] = h.view(np.uint8).reshape(rows, k // bs, 2)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qt).reshape(rows, k))
    return torch.from_numpy(raw.copy()), int(qt), w


def activation_error_bound(w: torch.Tensor, x: torch.Tensor, type_name: str) -> torch.Tensor:
    """(T, N) bounds on |ggml's product - the exact product| from quantizing x to 8 bits per block of 32
    (Q8_0, Q8_1: a float16 scale amax/127) or 256 (Q8_K: a float32 scale): each activation moves by at
    most ~0.5 of its block's step, plus the float16 rounding of the scale (127 steps x 2^-11) and of
    Q8_1's stored block sum (which multiplies Q4_1/Q5_1's min); float32 accumulation on top."""
    T, K = x.shape
    blk = 256 if type_name.endswith("_K") else 32
    step = x.abs().reshape(T, K // blk, blk).amax(-1) / 127
    per = step * (0.5 + (127 * 2.0**-11 if blk == 32 else 1e-6))  # (T, K/blk)
    bound = w.abs().double().reshape(-1, K // blk, blk).sum(-1) @ per.double().T  # (N, T)
    if type_name in ("Q4_1", "Q5_1"):  # the min term uses the block sum of x in float16
        wmin = w.double().reshape(-1, K // blk, blk).amin(-1).abs()
        xsum = x.double().reshape(T, K // blk, blk).sum(-1).abs() + blk * step.double()
        bound = bound + wmin @ (xsum * 2.0**-10).T
    exact_scale = (w.abs().double() @ x.abs().double().T)
    return (bound + 1e-5 * exact_scale).T


@needs_ggml
@pytest.mark.parametrize("type_name", TYPE_NAMES)
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ggml_product_is_bounded_by_the_float32_one(type_name, T, threads):
    N, K = 70, 768
    blocks, qt, w = random_blocks(type_name, N, K, seed=T * 7 + threads)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(T)) * 3 + 0.5
    bias = torch.randn(N)
    fn, fixed = ggml_cpu.bind(qt, blocks, K)
    # write into the middle columns of a wider poisoned output: the columns around stay untouched
    y = torch.full((T, N + 9), float("nan"))
    rc = fn(*fixed, x.data_ptr(), T, y.data_ptr() + 4 * 4, N + 9, bias.data_ptr(), threads)
    assert rc == 0
    assert torch.isnan(y[:, :4]).all() and torch.isnan(y[:, 4 + N :]).all()
    got = y[:, 4 : 4 + N].double()
    assert torch.isfinite(got).all()
    exact = x.double() @ w.double().T + bias.double()
    err = (got - exact).abs()
    assert (err <= activation_error_bound(w, x, type_name)).all(), f"max error {err.max():.3g}"
    # and it is not the float32 product itself (the activations really were quantized): a sanity check
    # that the bound is not vacuous
    assert err.max() > 0


@needs_ggml
def test_quant_linear_uses_ggml_for_every_part():
    from leank.runtime.model.linear import QuantLinear

    parts, dense = [], []
    for i, name in enumerate(["Q4_1", "Q8_0", "Q6_K", "Q4_K"]):
        b, qt, w = random_blocks(name, 16 + 8 * i, 512, seed=i)
        parts.append((b, qt))
        dense.append(w)
    w = torch.cat(dense)
    bias = torch.randn(w.shape[0])
    lin = QuantLinear(parts, 512, bias)
    assert [fn.__name__ for fn, _, _ in lin._calls] == ["leank_ggml_matmul"] * 4
    x = torch.randn(2, 1, 512)
    got = lin(x).double()
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert got.shape == ref.shape
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.02  # 8-bit activations: ~0.5 % on random data


def run_py(code: str, **env) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(cpu.library() is None, reason="C kernels unavailable")
def test_disabled_ggml_falls_back_to_leanks_kernels():
    out = run_py("import torch; from leank.kernels import ggml_cpu; from leank.runtime.model.linear import QuantLinear, weights_path;"
                 "b = torch.randint(0, 255, (4, 18), dtype=torch.uint8); b[:, 1] = 0x20;"
                 "lin = QuantLinear([(b, 2)], 32); print(lin._calls[0][0].__name__);"
                 "print(weights_path({'Q4_0': 3}, torch.device('cpu')))", LEANK_GGML="0")
    name, path = out.strip().splitlines()
    assert name == "leank_qmatmul"
    assert "leank's C kernels" in path and "LEANK_GGML" in path


def test_an_unchecked_llama_cpp_version_is_not_called(monkeypatch):
    monkeypatch.setattr(ggml_cpu, "_state", {})
    monkeypatch.setattr(ggml_cpu, "ABI_CHECKED", ("0.0.0",))
    assert not ggml_cpu.available()
    assert "ABI" in ggml_cpu.unavailable_reason() or "not installed" in ggml_cpu.unavailable_reason()
    b = torch.zeros(2, 18, dtype=torch.uint8)
    assert ggml_cpu.bind(2, b, 32) is None


def test_a_missing_library_is_not_called(monkeypatch, tmp_path):
    monkeypatch.setattr(ggml_cpu, "_state", {})
    monkeypatch.setattr(ggml_cpu, "_lib_dir", lambda: tmp_path)
    if cpu.library() is None:
        pytest.skip("C kernels unavailable")
    assert not ggml_cpu.available()
    assert "libggml-cpu.so" in ggml_cpu.unavailable_reason() or "not installed" in ggml_cpu.unavailable_reason()
