"""The CUDA block decoders of `leank.kernels.gguf_cuda`, compiled for the host by nvcc (no GPU needed):
decoded weights equal gguf-py's bit for bit for every type, and the gemv's lanes, summed in the
device's butterfly order, give x @ W^T. Skipped where nvcc is absent (the GPU tests run the same
functions on the device)."""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from blocks import TYPE_NAMES, gemv_error_bound, quantized_activations, random_blocks  # tests/blocks.py
from leank.kernels import gguf_cuda

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
MAXM = 8


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_cuda")
    src, so = d / "blocks.cu", d / "blocks.so"
    src.write_text(gguf_cuda.host_source(TYPE_NAMES, "bfloat16", MAXM))
    r = subprocess.run([NVCC, "-x", "cu", "-O2", "-shared", "-Xcompiler", "-fPIC", "-o", str(so), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(so))


def ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_host_decoders_equal_gguf_py_bit_for_bit(lib, type_name):
    qk = gguf_cuda.TYPES[type_name][0]
    blocks, _, w = random_blocks(type_name, rows=23, k=3 * qk, seed=11, signed=True)
    ids = torch.tensor([4, 0, 22, 4, 13], dtype=torch.int32)
    out = torch.full((len(ids), w.shape[1]), float("nan"))
    getattr(lib, f"leank_host_{type_name}_dequant")(ptr(blocks), ptr(ids), ptr(out), len(ids), w.shape[1],
                                                     blocks.shape[1])
    assert torch.equal(out.view(torch.int32), w[ids.long()].view(torch.int32))


@pytest.mark.parametrize("type_name", TYPE_NAMES)
@pytest.mark.parametrize("m", [1, 3, MAXM])
def test_host_gemv_lanes_sum_to_the_product(lib, type_name, m):
    qk = gguf_cuda.TYPES[type_name][0]
    k = qk * (2 if qk == 256 else 9)  # more units than lanes for the small blocks, fewer for the K-quants
    blocks, _, w = random_blocks(type_name, rows=19, k=k, seed=5 + m, signed=True)
    x = torch.randn(m, k).to(torch.bfloat16)
    x[0, :32] = 0  # a group of zeros: scale 0
    xq = torch.full((m, k), 99, dtype=torch.int8)
    xd = torch.full((m, k // 32), float("nan"))
    y = torch.full((m, 19), float("nan"))
    getattr(lib, f"leank_host_{type_name}_gemv")(ptr(blocks), ptr(x), ptr(xq), ptr(xd), ptr(y), 19, m, k,
                                                  blocks.shape[1])
    ref_q, ref_d = quantized_activations(x)
    assert torch.equal(xq, ref_q) and torch.equal(xd, ref_d)
    xhat = (ref_q.double().reshape(m, -1, 32) * ref_d.double()[..., None]).reshape(m, k)
    exact_q = xhat @ w.double().T  # the product the kernel computes, up to float32 rounding
    scale = xhat.abs() @ w.double().abs().T
    assert ((y.double() - exact_q).abs() <= 1e-5 * scale + 1e-30).all()
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).abs() <= gemv_error_bound(x, w) * 1.001 + 1e-5 * scale + 1e-30).all()


# --- the fused decode-step kernels (gguf_cuda.STEP), on the host ------------------------------------------
def test_host_rmsnorm_into_8_bits_matches_the_unfused_ops(lib):
    from blocks import assert_same_quantized, rmsnorm_reference

    M, K, eps = 3, 4096 + 96, 1e-5
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(M, K, generator=gen) * torch.linspace(0.1, 8, K)).to(torch.bfloat16)
    w = torch.rand(K, generator=gen) * 2 - 0.5
    xq = torch.full((M, K), 99, dtype=torch.int8)
    xd = torch.full((M, K // 32), float("nan"))
    lib.leank_host_rmsnorm_qx(ptr(x), ptr(w), ptr(xq), ptr(xd), M, K, ctypes.c_float(eps))
    assert_same_quantized(xq, xd, rmsnorm_reference(x, w, eps))


def test_host_silu_times_up_into_8_bits_matches_the_unfused_ops(lib):
    from blocks import assert_same_quantized, silu_mul_reference

    M, F = 2, 14336
    gu = (torch.randn(M, 2 * F, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    xq = torch.full((M, F), 99, dtype=torch.int8)
    xd = torch.full((M, F // 32), float("nan"))
    lib.leank_host_silu_mul_qx(ptr(gu), ptr(xq), ptr(xd), M, F)
    assert_same_quantized(xq, xd, silu_mul_reference(gu))


@pytest.mark.parametrize("neox", [True, False])
def test_host_rope_equals_the_unfused_rotation_bit_for_bit(lib, neox):
    from blocks import rope_reference

    M, Hq, Hkv, D, P = 3, 6, 2, 128, 9000
    gen = torch.Generator().manual_seed(5)
    ld = (Hq + 2 * Hkv) * D
    qkv = torch.randn(M, ld, generator=gen).to(torch.bfloat16)
    theta = torch.arange(P, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
    pos = torch.tensor([0, 8191, 4242], dtype=torch.int64)
    q = torch.full((M, Hq, D), float("nan"), dtype=torch.bfloat16)
    k = torch.full((M, Hkv, D), float("nan"), dtype=torch.bfloat16)
    lib.leank_host_rope_qk(ptr(qkv), ptr(pos), ptr(cos), ptr(sin), ptr(q), ptr(k), M, Hq, Hkv, D, ld, int(neox))
    rq, rk = rope_reference(qkv, pos, cos, sin, Hq, Hkv, D, neox)
    assert torch.equal(q.view(torch.int16), rq.view(torch.int16)) and torch.equal(k.view(torch.int16), rk.view(torch.int16))


@pytest.mark.parametrize("type_name", TYPE_NAMES)
@pytest.mark.parametrize("nr", gguf_cuda.GEMV1_HOST_ROWS)
def test_host_one_row_gemv_equals_the_lane_sums_bit_for_bit(lib, type_name, nr):
    """The one-row kernel (several weight rows a warp, the activations loaded once for them) adds each row
    in the same order as the general kernel: the same float32 bits, rows past a multiple of nr included."""
    qk = gguf_cuda.TYPES[type_name][0]
    k, n = qk * (3 if qk == 256 else 41), 23
    blocks, _, _ = random_blocks(type_name, rows=n, k=k, seed=nr, signed=True)
    x = torch.randn(1, k).to(torch.bfloat16)
    xq = torch.full((1, k), 99, dtype=torch.int8)
    xd = torch.full((1, k // 32), float("nan"))
    y = torch.full((1, n), float("nan"))
    getattr(lib, f"leank_host_{type_name}_gemv")(ptr(blocks), ptr(x), ptr(xq), ptr(xd), ptr(y), n, 1, k, blocks.shape[1])
    y1 = torch.full((1, n + 4), float("nan"))
    getattr(lib, f"leank_host_{type_name}_{nr}_gemv1")(ptr(blocks), ptr(xq), ptr(xd), ptr(y1), n, k, blocks.shape[1])
    assert torch.equal(y1[:, :n].view(torch.int32), y.view(torch.int32)) and y1[:, n:].isnan().all()
