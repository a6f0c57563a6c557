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


def make_layer(B, Hkv, R, D, F, M, G, k_bits, v_bits, counts, seed=0, kv_dtype=torch.float32):
    """Random queries, full region and middle groups (kept counts per KV head; 0 = no middle); the full
    region and unquantized middle rows in `kv_dtype`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * R, 1, D, generator=gen)
    # full region as slices of larger buffers, as the cache holds them
    fk = (torch.randn(B, Hkv, F + 7, D, generator=gen) * 2).to(kv_dtype)[:, :, :F]
    fv = torch.randn(B, Hkv, F + 7, D, generator=gen).to(kv_dtype)[:, :, :F]
    groups = []
    for c in sorted(set(counts) - {0}):
        heads = torch.tensor([h for h in range(Hkv) if counts[h] == c])
        channels = torch.stack([torch.sort(torch.randperm(D, generator=gen)[:c]).values for _ in heads])
        k = torch.randn(B, len(heads), M, c, generator=gen) * 2 + 0.3
        v = torch.randn(B, len(heads), M, D, generator=gen)
        g = MiddleGroup(heads, channels, None, None)
        if k_bits == 16:
            g.k = k.to(kv_dtype)
        else:
            g.k, g.k_scale, g.k_min = quantize_k(k, k_bits, G)
        if v_bits == 16:
            g.v = v.to(kv_dtype)
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
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_into_poisoned_output(case, threads, kv_dtype):
    B, Hkv, R, D, F, M, G, kb, vb, counts = case
    q, fk, fv, groups = make_layer(*case, kv_dtype=kv_dtype)
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


@needs_lib
@pytest.mark.parametrize("T", [2, 7, 64])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_several_query_tokens_after_a_compressed_past_match_the_reference(T, kv_dtype):
    """A chat turn's new tokens (the last T of the full region) over the middle region, causal within the
    full region: one C call (`leank_attend_chunk`), equal to the reference's multi-token path."""
    q, fk, fv, groups = make_layer(2, 2, 3, 64, 80, 96, 32, 2, 4, [8, 40], seed=T, kv_dtype=kv_dtype)
    qt = torch.randn(2, 6, T, 64, generator=torch.Generator().manual_seed(T))
    got = cpu.compressed_attention(qt, fk, fv, groups, 96, 2, 4, 32, 0.12)
    ref = reference.compressed_attention(qt, fk, fv, groups, 96, 2, 4, 32, 0.12)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # and token i really is causal: changing a later full-region key moves only the later tokens' outputs
    fk2 = fk.clone()
    fk2[:, :, -1] += 5
    moved = (cpu.compressed_attention(qt, fk2, fv, groups, 96, 2, 4, 32, 0.12) - got).abs().amax((0, 1, 3))
    assert (moved[:-1] < 1e-5).all() and moved[-1] > 1e-2  # (a copied buffer may sum in another order)


def test_what_the_kernel_does_not_handle_goes_to_the_reference():
    # more query tokens than MULTI_QUERY_TOKENS, bfloat16 and per-sequence lengths all take the
    # reference path: equal results
    q, fk, fv, groups = make_layer(2, 2, 2, 64, 40, 64, 32, 2, 2, [8, 16])
    T = cpu.MULTI_QUERY_TOKENS + 1
    q3 = torch.randn(2, 4, T, 64)
    fk3 = torch.cat([fk, torch.randn(2, 2, T, 64)], 2)
    fv3 = torch.cat([fv, torch.randn(2, 2, T, 64)], 2)
    assert torch.equal(cpu.compressed_attention(q3, fk3, fv3, groups, 64, 2, 2, 32, 0.1),
                       reference.compressed_attention(q3, fk3, fv3, groups, 64, 2, 2, 32, 0.1))
    lens = torch.tensor([40, 20])
    assert torch.equal(cpu.compressed_attention(q, fk, fv, groups, 64, 2, 2, 32, 0.1, lens, torch.tensor([64, 32])),
                       reference.compressed_attention(q, fk, fv, groups, 64, 2, 2, 32, 0.1, lens, torch.tensor([64, 32])))
    # more (sequence, head) pairs than the kernel's work list holds
    qm, km, vm = torch.randn(1100, 8, 1, 64), torch.randn(1100, 4, 9, 64), torch.randn(1100, 4, 9, 64)
    assert torch.equal(cpu.compressed_attention(qm, km, vm, [], 0, 16, 16, 8, 0.1),
                       reference.compressed_attention(qm, km, vm, [], 0, 16, 16, 8, 0.1))
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


# --- quantized matrices ----------------------------------------------------------------------------
def random_blocks(type_name: str, rows: int, k: int, seed: int = 0):
    """Random GGUF blocks of `type_name` (every byte random, the float16 scales set to sane values)."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    qt = Q[type_name]
    bs, tb = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // bs * tb), dtype=np.uint8)
    blk = raw.reshape(rows, k // bs, tb)
    halves = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}[type_name]
    for off in halves:
        h = (rng.random((rows, k // bs)) * 0.02 + 0.001).astype(np.float16)
        blk[:, :, off : off + 2] = h.view(np.uint8).reshape(rows, k // bs, 2)
    return raw, int(qt)


BLOCK_TYPE_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture
def without_ggml(monkeypatch):
    """QuantLinear on leank's own cpu_matmul.c (float32 activations), not ggml's kernels (test_ggml_cpu.py)."""
    from leank.kernels import ggml_cpu

    monkeypatch.setattr(ggml_cpu, "_state", {"loaded": None, "why": "turned off by the test"})


@needs_lib
@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
def test_block_decoding_matches_gguf_py(type_name):
    import gguf

    raw, qt = random_blocks(type_name, 37, 512)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt).reshape(37, 512))
    blocks = torch.from_numpy(raw.copy())
    assert torch.equal(cpu.dequantize(blocks, qt, 512), ref)
    ids = torch.tensor([[36, 0], [5, 5]])
    assert torch.equal(cpu.dequantize_rows(blocks, qt, 512, ids), ref[ids])
    with pytest.raises(IndexError, match="token id 37"):
        cpu.dequantize_rows(blocks, qt, 512, torch.tensor([3, 37]))


@needs_lib
@pytest.mark.parametrize("type_name", BLOCK_TYPE_NAMES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_quantized_matmul_matches_the_dequantized_product(type_name, rows, without_ggml):
    import gguf

    from leank.runtime.model.linear import QuantLinear

    raw, qt = random_blocks(type_name, 45, 768, seed=rows)
    w = torch.from_numpy(gguf.quants.dequantize(raw, qt).reshape(45, 768))
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    y = QuantLinear([(torch.from_numpy(raw.copy()), qt)], 768)(x)  # rows <= QUANT_DIRECT_ROWS: the C product
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_lib
def test_quant_linear_parts_bias_and_long_inputs(without_ggml):
    """q, k and v of different types stay separate parts; prompts (many rows) take the float32 path."""
    import gguf

    from leank.runtime.model.linear import QUANT_DIRECT_ROWS, QuantLinear

    parts, dense = [], []
    for i, name in enumerate(["Q4_1", "Q8_0", "Q6_K"]):
        raw, qt = random_blocks(name, 16 + 8 * i, 256, seed=i)
        parts.append((torch.from_numpy(raw.copy()), qt))
        dense.append(torch.from_numpy(gguf.quants.dequantize(raw, qt).reshape(-1, 256)))
    w = torch.cat(dense)
    bias = torch.randn(w.shape[0])
    lin = QuantLinear(parts, 256, bias)
    assert lin.out_features == w.shape[0] and torch.equal(lin.weight, w)
    for rows in (1, 5, QUANT_DIRECT_ROWS + 1, 40):
        x = torch.randn(2, rows, 256)
        ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
        got = lin(x)
        assert got.shape == (2, rows, w.shape[0])
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
