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
