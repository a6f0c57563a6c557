"""The C decode-attention kernel (leank.kernels.cpu) against the torch reference, on random data."""
import os
import subprocess
import sys

import pytest
import torch

from leank.kernels import cpu, dispatch, reference
from leank.kernels.quant import quantize_k, quantize_v
from leank.kernels.reference import MiddleGroup

LIB = cpu.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C kernels unavailable: {cpu.unavailable_reason()}")


def make_layer(B, Hkv, R, D, F, M, G, k_bits, v_bits, counts, seed=0):
    """Random queries, full region and middle groups (kept counts per KV head; 0 = no middle)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * R, 1, D, generator=gen)
    # full region as slices of larger buffers, as the cache holds them
    fk = (torch.randn(B, Hkv, F + 7, D, generator=gen) * 2)[:, :, :F]
    fv = torch.randn(B, Hkv, F + 7, D, generator=gen)[:, :, :F]
    groups = []
    for c in sorted(set(counts) - {0}):
        heads = torch.tensor([h for h in range(Hkv) if counts[h] == c])
        channels = torch.stack([torch.sort(torch.randperm(D, generator=gen)[:c]).values for _ in heads])
        k = torch.randn(B, len(heads), M, c, generator=gen) * 2 + 0.3
        v = torch.randn(B, len(heads), M, D, generator=gen)
        g = MiddleGroup(heads, channels, None, None)
        if k_bits == 16:
            g.k = k
        else:
            g.k, g.k_scale, g.k_min = quantize_k(k, k_bits, G)
        if v_bits == 16:
            g.v = v
        else:
            g.v, g.v_scale, g.v_min = quantize_v(v, v_bits, G)
        groups.append(g)
    return q, fk, fv, groups


CASES = [
    # B, Hkv, R, D, F, M, G, k_bits, v_bits, kept counts per KV head
    (1, 3, 3, 64, 37, 96, 32, 2, 2, [19, 0, 40]),
    (2, 2, 4, 128, 5, 64, 32, 4, 8, [128, 7]),
    (1, 4, 1, 64, 1, 32, 16, 16, 16, [3, 3, 64, 1]),
    (3, 1, 8, 64, 100, 0, 32, 2, 2, [10]),
    (2, 8, 2, 128, 301, 640, 64, 4, 2, [0, 5, 17, 128, 64, 64, 1, 33]),
    (1, 2, 5, 64, 513, 1024, 32, 8, 4, [64, 0]),
    (4, 2, 6, 64, 77, 160, 16, 2, 16, [1, 63]),
]


@needs_lib
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_reference_into_poisoned_output(case, threads):
    B, Hkv, R, D, F, M, G, kb, vb, counts = case
    q, fk, fv, groups = make_layer(*case)
    ref = reference.compressed_attention(q, fk, fv, groups, M, kb, vb, G, 0.11)
    out = torch.full(q.shape, float("nan"))
    cpu._attend(LIB, q, fk, fv, groups, M, kb, vb, G, 0.11, out, threads=threads)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_lib
def test_long_context_is_split_across_threads_and_merged():
    case = (1, 2, 3, 64, 700, 4096, 32, 2, 2, [20, 64])
    q, fk, fv, groups = make_layer(*case, seed=3)
    ref = reference.compressed_attention(q, fk, fv, groups, 4096, 2, 2, 32, 0.125)
    for threads in (1, 2, 7):
        out = torch.full(q.shape, float("nan"))
        cpu._attend(LIB, q, fk, fv, groups, 4096, 2, 2, 32, 0.125, out, threads=threads)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_lib
def test_head_table_follows_buffers_that_moved():
    q, fk, fv, groups = make_layer(1, 2, 2, 64, 9, 64, 32, 4, 4, [16, 8])
    a = cpu.compressed_attention(q, fk, fv, groups, 64, 4, 4, 32, 0.1)
    for g in groups:  # a grown buffer: same values at a new address
        g.k, g.v = g.k.clone(), g.v.clone()
        g.v[..., 0] ^= 0xFF  # and different codes, which the old table would not see
    b = cpu.compressed_attention(q, fk, fv, groups, 64, 4, 4, 32, 0.1)
    torch.testing.assert_close(b, reference.compressed_attention(q, fk, fv, groups, 64, 4, 4, 32, 0.1), rtol=1e-4, atol=1e-5)
    assert not torch.equal(a, b)


def test_what_the_kernel_does_not_handle_goes_to_the_reference():
    # several query tokens, bfloat16 and per-sequence lengths all take the reference path: equal results
    q, fk, fv, groups = make_layer(2, 2, 2, 64, 40, 64, 32, 2, 2, [8, 16])
    q3 = torch.randn(2, 4, 3, 64)
    fk3 = torch.cat([fk, torch.randn(2, 2, 3, 64)], 2)
    fv3 = torch.cat([fv, torch.randn(2, 2, 3, 64)], 2)
    assert torch.equal(cpu.compressed_attention(q3, fk3, fv3, groups, 64, 2, 2, 32, 0.1),
                       reference.compressed_attention(q3, fk3, fv3, groups, 64, 2, 2, 32, 0.1))
    lens = torch.tensor([40, 20])
    assert torch.equal(cpu.compressed_attention(q, fk, fv, groups, 64, 2, 2, 32, 0.1, lens, torch.tensor([64, 32])),
                       reference.compressed_attention(q, fk, fv, groups, 64, 2, 2, 32, 0.1, lens, torch.tensor([64, 32])))
    qb, fkb, fvb = q.bfloat16(), fk.bfloat16(), fv.bfloat16()
    assert torch.equal(cpu.compressed_attention(qb, fkb, fvb, groups, 64, 2, 2, 32, 0.1),
                       reference.compressed_attention(qb, fkb, fvb, groups, 64, 2, 2, 32, 0.1))


def run_py(code: str, **env) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_disabled_kernels_fall_back_to_torch():
    out = run_py("from leank.kernels import dispatch; print(dispatch.ops_for('cpu').name);"
                 "print(dispatch.active_path('cpu'))", LEANK_CPU_KERNELS="0")
    name, path = out.strip().splitlines()
    assert name == "torch"
    assert "LEANK_CPU_KERNELS" in path


def test_a_missing_compiler_falls_back_to_torch(tmp_path):
    out = run_py("from leank.kernels import cpu, dispatch; print(cpu.library()); print(dispatch.ops_for('cpu').name)",
                 CC="/nonexistent/cc", PATH=str(tmp_path), LEANK_CACHE_DIR=str(tmp_path / "cache"))
    lib, name = out.strip().splitlines()
    assert lib == "None" and name == "torch"


@needs_lib
def test_fresh_build_into_an_empty_cache_dir(tmp_path):
    out = run_py("from leank.kernels import cpu; print(cpu.library() is not None); print(cpu.unavailable_reason())",
                 LEANK_CACHE_DIR=str(tmp_path))
    assert out.split() == ["True", "None"]
    built = list((tmp_path / "cpu-kernels").glob("leank-cpu-*.so"))
    assert len(built) == 1
    assert not list((tmp_path / "cpu-kernels").glob(".build-*"))  # no temporary left behind
    assert dispatch.ops_for("cpu").name == "C"
