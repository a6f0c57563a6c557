"""ggml's CPU matrix multiply through leank (kernels/ggml_cpu.py, kernels/ggml_graph.c) against the float32
path, on random blocks of every type; and the clean fall-back to leank's own C kernels."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from blocks import HALVES, TYPE_NAMES, random_blocks  # tests/blocks.py
from leank.kernels import cpu, ggml_cpu

needs_ggml = pytest.mark.skipif(not ggml_cpu.available(), reason=f"ggml unavailable: {ggml_cpu.unavailable_reason()}")


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
@pytest.mark.parametrize("T", [1, 3, 40, 300])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N", [70, 72])
def test_ggml_product_is_bounded_by_the_float32_one(type_name, T, threads, N):
    """One row (a decode step: ggml's vec_dot) and many (a prompt: its tiled kernels), every type; 72
    rows (a multiple of 8) let ggml repack the types it interleaves on this CPU, 70 do not."""
    K = 768
    blocks, qt, w = random_blocks(type_name, N, K, seed=T * 7 + threads)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(T)) * 3 + 0.5
    mat = ggml_cpu.matrix([(blocks, qt)], K)
    if N % 8:
        assert mat.repacked == [False]
    y = torch.full((T, N), float("nan"))  # poisoned: every value must be written
    assert mat.matmul(x, threads, out=y) is y
    got = y.double()
    assert torch.isfinite(got).all()
    exact = x.double() @ w.double().T
    err = (got - exact).abs()
    assert (err <= activation_error_bound(w, x, type_name)).all(), f"max error {err.max():.3g}"
    # and it is not the float32 product itself (the activations really were quantized): a sanity check
    # that the bound is not vacuous
    assert err.max() > 0


@needs_ggml
def test_parts_of_different_types_land_side_by_side_and_quant_linear_uses_ggml():
    from leank.runtime.model.linear import QuantLinear

    parts, dense = [], []
    for i, name in enumerate(["Q4_1", "Q8_0", "Q6_K", "Q4_K", "Q5_K"]):
        b, qt, w = random_blocks(name, 16 + 8 * i, 512, seed=i)
        parts.append((ggml_cpu.aligned(b), qt))  # as a GGUF file's 32-byte aligned tensors are
        dense.append(w)
    w = torch.cat(dense)
    bias = torch.randn(w.shape[0])
    lin = QuantLinear(parts, 512, bias)
    assert lin.kernel == "ggml"
    assert all(a.data_ptr() == b.data_ptr() for (a, _), (b, _) in zip(lin.parts, parts))  # no copy
    for T in (1, 2, 37):
        x = torch.randn(2, T, 512)
        got = lin(x).double()
        ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
        assert got.shape == ref.shape
        col = 0
        for b, _ in parts:  # each part's own columns, not a neighbour's
            sl = slice(col, col + b.shape[0])
            rel = (got[..., sl] - ref[..., sl]).norm() / ref[..., sl].norm()
            assert 0 < rel < 0.02, (T, col, rel)  # 8-bit activations: ~0.5 % on random data
            col += b.shape[0]


@needs_ggml
def test_misaligned_blocks_are_copied_and_bad_layouts_refused():
    blocks, qt, w = random_blocks("Q4_K", 24, 512, seed=5)
    raw = torch.empty(blocks.numel() + 1, dtype=torch.uint8)
    shifted = raw[1:].view(blocks.shape)
    shifted.copy_(blocks)
    assert shifted.data_ptr() % ggml_cpu.ALIGN
    mat = ggml_cpu.matrix([(shifted, qt)], 512)
    assert mat.parts[0][0].data_ptr() % ggml_cpu.ALIGN == 0
    x = torch.randn(3, 512)
    rel = (mat.matmul(x, 1).double() - x.double() @ w.double().T).norm() / (x.double() @ w.double().T).norm()
    assert rel < 0.02
    # rows that are not ggml's row size for the type, an unknown type, a row length that is not whole
    # blocks: refused (None: leank's own kernels or the float path then), never a crash
    assert ggml_cpu.matrix([(blocks[:, :-2], qt)], 512) is None
    assert ggml_cpu.matrix([(blocks, 99)], 512) is None
    assert ggml_cpu.matrix([(blocks, qt)], 500) is None
    with pytest.raises(ValueError):
        mat.matmul(torch.randn(3, 256), 1)


def run_py(code: str, **env) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(cpu.library() is None, reason="C kernels unavailable")
def test_disabled_ggml_falls_back_to_leanks_kernels():
    out = run_py("import torch; from leank.kernels import ggml_cpu; from leank.runtime.model.linear import QuantLinear, weights_path;"
                 "b = torch.randint(0, 255, (4, 18), dtype=torch.uint8); b[:, 1] = 0x20;"
                 "lin = QuantLinear([(b, 2)], 32); print(lin.kernel);"
                 "print(weights_path({'Q4_0': 3}, torch.device('cpu')))", LEANK_GGML="0")
    name, path = out.strip().splitlines()
    assert name == "leank"
    assert "leank's C kernels" in path and "LEANK_GGML" in path


def test_an_unchecked_llama_cpp_version_is_not_called(monkeypatch):
    monkeypatch.setattr(ggml_cpu, "_state", {})
    monkeypatch.setattr(ggml_cpu, "ABI_CHECKED", ("0.0.0",))
    assert not ggml_cpu.available()
    assert "ABI" in ggml_cpu.unavailable_reason() or "not installed" in ggml_cpu.unavailable_reason()
    b = torch.zeros(2, 18, dtype=torch.uint8)
    assert ggml_cpu.matrix([(b, 2)], 32) is None


def test_a_missing_library_is_not_called(monkeypatch, tmp_path):
    monkeypatch.setattr(ggml_cpu, "_state", {})
    monkeypatch.setattr(ggml_cpu, "_lib_dir", lambda: tmp_path)
    if cpu.library() is None:
        pytest.skip("C kernels unavailable")
    assert not ggml_cpu.available()
    assert "libggml-cpu.so" in ggml_cpu.unavailable_reason() or "not installed" in ggml_cpu.unavailable_reason()


@needs_ggml
def test_repacking_can_be_turned_off_and_both_layouts_agree(monkeypatch):
    """The repacked copy (ggml's interleaved layout, where this CPU has one) and the file's layout give
    products within the same bound; LEANK_GGML_REPACK=0 keeps the file's layout."""
    b, qt, w = random_blocks("Q4_K", 64, 512, 1)
    b = ggml_cpu.aligned(b)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    repacked = ggml_cpu.matrix([(b, qt)], 512)
    monkeypatch.setenv("LEANK_GGML_REPACK", "0")
    plain = ggml_cpu.matrix([(b, qt)], 512)
    assert plain.repacked == [False]
    bound = activation_error_bound(w, x, "Q4_K")
    exact = x.double() @ w.double().T
    for mat in (plain, repacked):
        assert ((mat.matmul(x, 2).double() - exact).abs() <= bound).all()
