"""The C paths of a chat turn after a compressed past, against the torch reference on random data:
several query tokens in one call (`leank_attend_chunk`), KIVI quantization (`cpu_quant.c`, byte for
byte `kernels/quant.py`) and a layer's move into the middle region (`CompressedCache._compact`)."""
import pytest
import torch

from leank.kernels import cpu, dispatch, quant, reference
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.policy import CachePolicy
from test_compressed_cache import args_for, random_mask
from test_cpu_kernels import make_layer

LIB = cpu.library()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"C kernels unavailable: {cpu.unavailable_reason()}")

CHUNK_CASES = [
    # B, Hkv, R, D, F, M, G, k_bits, v_bits, kept counts per KV head, T
    (1, 3, 3, 64, 640, 96, 32, 2, 2, [19, 0, 40], 26),  # SmolLM2's shape: a turn after 640 + 96 tokens
    (2, 2, 4, 128, 301, 64, 32, 4, 8, [128, 7], 33),
    (1, 4, 1, 64, 71, 32, 16, 16, 16, [3, 3, 64, 1], 71),  # T == F: the queries are the whole full region
    (2, 1, 8, 128, 100, 0, 32, 2, 2, [10], 5),  # no middle region yet
    (1, 2, 5, 64, 513, 1024, 32, 8, 4, [64, 0], 300),  # more rows than one block holds
    (3, 2, 6, 64, 77, 160, 16, 2, 16, [1, 63], 2),
    (1, 2, 2, 128, 1100, 2048, 64, 4, 2, [0, 0], 1024),  # QUERY_CHUNK tokens, heads without middle
]


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_chunk_matches_reference_into_poisoned_output(case, threads, kv_dtype):
    *layer, T = case
    B, Hkv, R, D, F, M, G, kb, vb, _ = layer
    _, fk, fv, groups = make_layer(*layer, seed=T, kv_dtype=kv_dtype)
    q = torch.randn(B, Hkv * R, T, D, generator=torch.Generator().manual_seed(T + 1))
    ref = reference.compressed_attention(q, fk, fv, groups, M, kb, vb, G, 0.11)
    out = torch.full(q.shape, float("nan"))
    cpu._attend(LIB, q, fk, fv, groups, M, kb, vb, G, 0.11, out, threads=threads)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_chunk_is_causal_within_the_full_region(kv_dtype):
    """Query token i sees full-region tokens up to its own (F - T + i): a huge later key and value
    move only the tokens at or after it (the earlier ones stay bit for bit: masked tokens weigh exactly
    0); the middle region is seen by every token."""
    B, Hkv, R, D, F, M, G, T = 1, 2, 3, 64, 50, 64, 32, 9
    q0, fk, fv, groups = make_layer(B, Hkv, R, D, F, M, G, 2, 2, [16, 64], seed=5, kv_dtype=kv_dtype)
    q = torch.randn(B, Hkv * R, T, D)
    base = cpu.compressed_attention(q, fk, fv, groups, M, 2, 2, G, 0.1)
    for j in (F - T, F - 4, F - 1):  # the full region's token j is query token j - (F - T)
        fk2, fv2 = fk.clone(), fv.clone()
        fk2[:, :, j] = 30.0
        fv2[:, :, j] = 1e4
        got = cpu.compressed_attention(q, fk2, fv2, groups, M, 2, 2, G, 0.1)
        i = j - (F - T)
        assert torch.equal(got[:, :, :i], base[:, :, :i])
        assert ((got[:, :, i:] - base[:, :, i:]).abs().amax((0, 1, 3)) > 1.0).all()
    for g in groups:  # a middle code change moves every token
        g.v = g.v.clone()
        g.v[:, :, 3] ^= 0xFF
    moved = (cpu.compressed_attention(q, fk, fv, groups, M, 2, 2, G, 0.1) - base).abs().amax((0, 1, 3))
    assert (moved > 1e-6).all()


def test_compressed_attention_takes_a_query_chunk_in_one_call():
    assert cpu.MULTI_QUERY_TOKENS == 1024  # the runtime's QUERY_CHUNK
    from leank.runtime.cache.base import QUERY_CHUNK

    assert QUERY_CHUNK == cpu.MULTI_QUERY_TOKENS


# --- quantization ------------------------------------------------------------------------------------
def same(a, b) -> bool:
    """Bit for bit, but for the sign of a zero scale or min: where a group's minimum (or a zero span) is
    both +0 and -0, torch's reduction order picks either (`cpu_quant.c` says more); they decode alike."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype != torch.float16:
        return torch.equal(a, b)
    ia, ib = a.view(torch.int16), b.view(torch.int16)
    zero = (a == 0) & (b == 0)
    return torch.equal(torch.where(zero, 0, ia), torch.where(zero, 0, ib))


def random_values(shape, gen, scale=1.0):
    """Channels of unlike spread and offset, as K has (an outlier channel included)."""
    x = torch.randn(*shape, generator=gen) * (torch.rand(shape[-1], generator=gen) * 3 + 0.01) + torch.randn(shape[-1], generator=gen)
    x[..., 0] *= 40
    return x * scale


@pytest.mark.parametrize("bits", quant.PACKABLE_BITS)
@pytest.mark.parametrize("group", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_is_bit_identical_to_quant_py(bits, group, dtype):
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    for shape in [(2, 3, 3 * group, 64), (1, 1, group, 128), (4, 2 * group, 40), (group, 7), (2, 2, 3, group, 24)]:
        for scale in (1e-6, 1.0, 3e4):
            x = random_values(shape, gen, scale).to(dtype)
            x.view(-1)[::97] = x.view(-1)[1]  # repeated values: ties of min and max
            if len(shape) >= 3:
                x[0, :group] = 0.25  # a constant group: zero span
            for a, b in zip(quant.quantize_k(x.float(), bits, group), cpu.quantize_k(x, bits, group)):
                assert same(a, b), (shape, scale)
            xv = x.transpose(-1, -2).contiguous()  # (.., D, T) as V: D a multiple of the group
            for a, b in zip(quant.quantize_v(xv.float(), bits, group), cpu.quantize_v(xv, bits, group)):
                assert same(a, b), (shape, scale)


def test_quantize_rounds_every_float16_like_torch():
    """Every float32 -> float16 rounding the quantizer does, over random bit patterns (subnormal, normal,
    ties, past 65504): constant groups, whose min is the rounded value itself (stepped down when it
    rounded up)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-2**31, 2**31 - 1, (400_000,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    ties = torch.arange(-2048, 2048, dtype=torch.int32) * 8192 + 4096 + (0x3F800000 - 2048 * 8192)  # halfway points
    x = torch.cat([x, ties.view(torch.float32), torch.tensor([65504.0, 65519.0, 65520.0, 2.0**-25, 2.0**-24, -0.0, 0.0])])
    x = x.repeat_interleave(8).reshape(1, -1, 1)[:, : x.numel() * 8 // 8 * 8]
    for bits in quant.PACKABLE_BITS:
        for a, b in zip(quant.quantize_k(x, bits, 8), cpu.quantize_k(x, bits, 8)):
            assert same(a, b)


def test_quantize_into_strided_views_with_gathered_heads_and_channels():
    """Straight from a full region's rows (a slice of a larger buffer, float16) into slices of a group's
    buffers: equal to quant.py on the gathered copy, and nothing outside the slices written."""
    gen = torch.Generator().manual_seed(3)
    full = (random_values((2, 4, 200, 64), gen)).to(torch.float16)
    src = full[:, :, 40:104]  # 64 tokens
    heads = torch.tensor([3, 1])
    channels = torch.stack([torch.sort(torch.randperm(64, generator=gen)[:22]).values for _ in range(2)])
    k = torch.gather(src[:, heads].float(), -1, channels.view(1, 2, 1, 22).expand(2, 2, 64, 22))
    codes, scale, mn = quant.quantize_k(k, 2, 32)
    ck = torch.full((2, 2, 200, 6), 0xAB, dtype=torch.uint8)
    sk, mk = torch.full((2, 2, 7, 22), float("nan"), dtype=torch.float16), torch.full((2, 2, 7, 22), float("nan"), dtype=torch.float16)
    cpu.quantize_k_into(src, 2, 32, ck[:, :, 96:160], sk[:, :, 3:5], mk[:, :, 3:5], heads, channels)
    assert same(ck[:, :, 96:160], codes) and same(sk[:, :, 3:5], scale) and same(mk[:, :, 3:5], mn)
    assert (ck[:, :, :96] == 0xAB).all() and (ck[:, :, 160:] == 0xAB).all()
    assert torch.isnan(sk[:, :, :3]).all() and torch.isnan(mk[:, :, 5:]).all()
    codes, scale, mn = quant.quantize_v(src[:, heads].float(), 4, 16)
    cv = torch.full((2, 2, 100, 32), 0xAB, dtype=torch.uint8)
    sv, mv = torch.empty(2, 2, 100, 4, dtype=torch.float16), torch.empty(2, 2, 100, 4, dtype=torch.float16)
    cpu.quantize_v_into(src, 4, 16, cv[:, :, 10:74], sv[:, :, 10:74], mv[:, :, 10:74], heads)
    assert same(cv[:, :, 10:74], codes) and same(sv[:, :, 10:74], scale) and same(mv[:, :, 10:74], mn)
    assert (cv[:, :, :10] == 0xAB).all() and (cv[:, :, 74:] == 0xAB).all()


# --- moving tokens into the middle region -----------------------------------------------------------
def group_state(cache):
    out = []
    for st in cache.layers:
        M, G = st.middle_len, cache.policy.group_size
        out += [st.full_len, st.middle_len, st.full_k[:, :, : st.full_len].clone(), st.full_v[:, :, : st.full_len].clone()]
        for g in st.groups:
            for t, per in ((g.k, 1), (g.v, 1), (g.k_scale, G), (g.k_min, G), (g.v_scale, 1), (g.v_min, 1)):
                out.append(None if t is None else t[:, :, : M // per].clone())
    return out


@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 4), (8, 8), (2, 16), (16, 4), (16, 16), (4, 2)])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("head_dim,n_kv,rep,batch,group", [(64, 3, 3, 1, 32), (128, 2, 4, 2, 64), (64, 4, 1, 1, 16)])
def test_compaction_equals_the_torch_path(kbits, vbits, rotate, head_dim, n_kv, rep, batch, group):
    """The C ops' move into the middle region (quantized straight from the full region) leaves exactly
    the cache the torch ops leave, and a turn of several tokens attends to the same result."""
    gen = torch.Generator().manual_seed(kbits + 10 * vbits + head_dim + rotate)
    mask = random_mask(2, n_kv, head_dim, generator=gen)
    policy = CachePolicy(mask=mask, k_bits=kbits, v_bits=vbits, sink_tokens=8, recent_tokens=40, block_tokens=max(32, group),
                         group_size=group, rotate=rotate)
    caches = [CompressedCache(policy, args_for(2, n_kv, head_dim), batch=batch) for _ in range(2)]
    assert caches[0].ops.name == "C"
    caches[1].ops = dispatch._REFERENCE
    for T in (150, 1, 1, 33, 7, 64, 1):  # a prompt, decode steps, later turns
        for layer in range(2):
            k = (torch.randn(batch, n_kv, T, head_dim, generator=gen) * 2).to(caches[0].kv_dtype)
            v = torch.randn(batch, n_kv, T, head_dim, generator=gen).to(caches[0].kv_dtype)
            q = torch.randn(batch, n_kv * rep, T, head_dim, generator=gen)
            outs = []
            for c in caches:
                c.append(layer, k, v)
                outs.append(c.attend(layer, q))
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=2e-5)
        a, b = group_state(caches[0]), group_state(caches[1])
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x is None and y is None) or (x == y if isinstance(x, int) else same(x, y))
    assert caches[0].layers[0].middle_len > 0
