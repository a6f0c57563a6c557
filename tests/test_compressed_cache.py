"""The compressed cache against dense attention and against masked/quantized references."""
import math
from types import SimpleNamespace

import pytest
import torch

from leank.kernels.quant import dequantize_k, dequantize_v, quantize_k, quantize_v
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.base import causal_attention
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.plan import planned_nbytes, region_sizes
from leank.runtime.cache.policy import CachePolicy


def args_for(n_layers, n_kv_heads, head_dim, n_heads=None):
    return SimpleNamespace(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                           n_heads=n_heads or n_kv_heads, context_length=1 << 20)


def random_mask(n_layers, n_kv_heads, head_dim, align=8, generator=None):
    kept = torch.zeros(n_layers, n_kv_heads, head_dim, dtype=torch.bool)
    for l in range(n_layers):
        for h in range(n_kv_heads):
            count = int(torch.randint(0, head_dim // align + 1, (1,), generator=generator)) * align
            kept[l, h, torch.randperm(head_dim, generator=generator)[:count]] = True
    kept[0, 0] = False  # always one fully pruned head
    if n_kv_heads > 1:
        kept[0, 1] = True  # and one that keeps everything
    return Mask(kept)


def drive(cache, steps, q_heads, prefill=0, generator=None, batch=1):
    """Feed a prefill of `prefill` tokens, then `steps` single tokens; yield (q, k, v, out) per call. Keys and
    values are drawn as the cache stores them (`kv_dtype`: float16 on CPU), so references see the same."""
    layers, H, D = cache.n_layers, cache.n_kv_heads, cache.head_dim
    sizes = ([prefill] if prefill else []) + [1] * steps
    for T in sizes:
        for layer in range(layers):
            k = (torch.randn(batch, H, T, D, generator=generator) * 2).to(cache.kv_dtype).float()
            v = torch.randn(batch, H, T, D, generator=generator).to(cache.kv_dtype).float()
            q = torch.randn(batch, q_heads, T, D, generator=generator)
            cache.append(layer, k, v)
            yield layer, q, k, v, cache.attend(layer, q)


def drive_history(cache, steps, q_heads, prefill=0, generator=None, batch=1):
    """`drive` on a one-layer cache, yielding (q, every key so far, every value so far, out)."""
    assert cache.n_layers == 1
    keys = values = None
    for _, q, k, v, out in drive(cache, steps, q_heads, prefill, generator, batch):
        keys = k if keys is None else torch.cat([keys, k], 2)
        values = v if values is None else torch.cat([values, v], 2)
        yield q, keys, values, out


@pytest.mark.parametrize("head_dim,n_kv,rep", [(64, 3, 3), (128, 2, 4), (64, 1, 8), (128, 4, 1)])
def test_all_ones_mask_without_quantization_equals_dense(head_dim, n_kv, rep):
    args = args_for(2, n_kv, head_dim)
    policy = CachePolicy(mask=Mask.ones(2, n_kv, head_dim), sink_tokens=5, recent_tokens=16, block_tokens=8, group_size=8)
    comp = CompressedCache(policy, args, batch=2)
    dense = DenseCache(2, n_kv, head_dim, batch=2)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    n = 0
    for (l, q, k, v, out), (_, _, _, _, ref) in zip(drive(comp, 61, n_kv * rep, 37, g1, 2),
                                                      drive(dense, 61, n_kv * rep, 37, g2, 2)):
        assert (out - ref).abs().max() <= 1e-5
        n += 1
    assert comp.layers[0].middle_len > 0  # the middle region was exercised
    assert comp.seq_len == dense.seq_len == 37 + 61


def masked_reference(keys, values, q, mask_layer, middle_range):
    """Dense attention of the last query over all keys, with the masked channels of middle keys zeroed;
    heads that keep no channel do not see the middle tokens at all (LeanK drops their middle V too)."""
    B, Hq, T, D = q.shape
    H = keys.shape[1]
    s, e = middle_range
    k = keys.clone()
    k[:, :, s:e] = k[:, :, s:e] * mask_layer[None, :, None, :].to(k.dtype)
    scores = torch.matmul(q.view(B, H, Hq // H * T, D), k.transpose(-1, -2)) / math.sqrt(D)
    pruned = mask_layer.sum(-1) == 0  # (H,)
    hidden = torch.zeros(H, keys.shape[2], dtype=torch.bool)
    hidden[pruned, s:e] = True
    S = keys.shape[2]
    future = torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]  # (T, S) causal
    hidden = hidden[:, None, None, :] | future[None, None, :, :]  # (H, 1, T, S)
    scores = scores.view(B, H, Hq // H, T, S).masked_fill(hidden, float("-inf")).view(B, H, -1, S)
    return torch.matmul(torch.softmax(scores, -1), values).view(B, Hq, T, D)


@pytest.mark.parametrize("head_dim,n_kv,rep,batch", [(64, 3, 3, 1), (128, 2, 4, 3), (64, 8, 1, 2), (128, 1, 8, 1)])
def test_mask_without_quantization_equals_zeroed_channel_reference(head_dim, n_kv, rep, batch):
    gen = torch.Generator().manual_seed(head_dim + n_kv)
    mask = random_mask(1, n_kv, head_dim, generator=gen)
    policy = CachePolicy(mask=mask, sink_tokens=4, recent_tokens=10, block_tokens=16, group_size=16)
    cache = CompressedCache(policy, args_for(1, n_kv, head_dim), batch=batch)
    checked = 0
    for q, keys, values, out in drive_history(cache, 70, n_kv * rep, 23, gen, batch):
        n = keys.shape[2]
        # the middle as it was when the query attended (compaction runs after attend)
        _, middle = region_sizes(policy, n - q.shape[2])
        ref = masked_reference(keys, values, q, mask.kept[0].float(), (4, 4 + middle))
        assert (out - ref).abs().max() <= 1e-5
        checked += middle > 0
    assert checked > 30


def quantized_middle(keys, values, mask_layer, s, e, kbits, vbits, group):
    """Keys/values with the middle tokens [s, e) replaced by their KIVI round trip (kept channels only)."""
    k, v = keys.clone(), values.clone()
    if e > s:
        for h in range(keys.shape[1]):
            ch = torch.nonzero(mask_layer[h]).flatten()
            if len(ch) == 0:
                continue
            km = keys[:, h : h + 1, s:e][..., ch]
            if kbits < 16:
                km = dequantize_k(*quantize_k(km, kbits, group), kbits, group, len(ch))
            k[:, h : h + 1, s:e, ch] = km
            if vbits < 16:
                v[:, h : h + 1, s:e] = dequantize_v(*quantize_v(values[:, h : h + 1, s:e], vbits, group), vbits, group,
                                                    values.shape[-1])
    return k, v


@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 4), (8, 8), (2, 16), (16, 4)])
@pytest.mark.parametrize("head_dim,n_kv,rep,batch", [(64, 3, 3, 1), (128, 2, 4, 2), (64, 8, 1, 1), (128, 1, 8, 3)])
def test_quantized_cache_equals_dequantized_reference(kbits, vbits, head_dim, n_kv, rep, batch):
    gen = torch.Generator().manual_seed(kbits * 100 + vbits + head_dim)
    mask = random_mask(1, n_kv, head_dim, generator=gen)
    policy = CachePolicy(mask=mask, k_bits=kbits, v_bits=vbits, sink_tokens=5, recent_tokens=11, block_tokens=32,
                         group_size=32)
    cache = CompressedCache(policy, args_for(1, n_kv, head_dim), batch=batch)
    checked = 0
    for q, keys, values, out in drive_history(cache, 75, n_kv * rep, 29, gen, batch):
        _, middle = region_sizes(policy, keys.shape[2] - q.shape[2])
        kq, vq = quantized_middle(keys, values, mask.kept[0], 5, 5 + middle, kbits, vbits, 32)
        ref = masked_reference(kq, vq, q, mask.kept[0].float(), (5, 5 + middle))
        assert (out - ref).abs().max() <= 2e-5 * max(1.0, float(ref.abs().max()))
        checked += middle > 0
    assert checked > 40


@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 16), (16, 4), (8, 2), (16, 16)])
def test_nbytes_equals_tensor_sizes_and_plan(kbits, vbits):
    head_dim, n_kv = 64, 3
    mask = random_mask(2, n_kv, head_dim, align=16, generator=torch.Generator().manual_seed(0))
    policy = CachePolicy(mask=mask, k_bits=kbits, v_bits=vbits, sink_tokens=8, recent_tokens=16, block_tokens=32, group_size=32)
    args = args_for(2, n_kv, head_dim)
    cache = CompressedCache(policy, args, batch=2)
    for _ in drive(cache, 45, n_kv, 131, batch=2):
        pass
    b = cache.nbytes()
    # sum of the stored slices of every tensor, computed independently of nbytes()
    total = 0
    for st in cache.layers:
        total += 2 * st.full_k[:, :, : st.full_len].numel() * st.full_k.element_size()
        for g in st.groups:
            M = st.middle_len
            for t, per in ((g.k, 1), (g.v, 1), (g.k_scale, policy.group_size), (g.k_min, policy.group_size),
                           (g.v_scale, 1), (g.v_min, 1)):
                if t is not None:
                    total += t[:, :, : M // per].numel() * t.element_size()
    assert b.total == total
    assert b.tokens == 176
    plan = planned_nbytes(policy, args, 176, batch=2, full_bytes_per_element=cache.kv_dtype.itemsize)
    assert (plan.full, plan.middle_k, plan.middle_v, plan.scales) == (b.full, b.middle_k, b.middle_v, b.scales)


def test_fully_pruned_heads_store_no_middle():
    kept = torch.zeros(1, 2, 64, dtype=torch.bool)
    kept[0, 1, :16] = True
    policy = CachePolicy(mask=Mask(kept), k_bits=2, v_bits=2, sink_tokens=4, recent_tokens=8, block_tokens=32)
    cache = CompressedCache(policy, args_for(1, 2, 64))
    for _ in drive(cache, 1, 2, 100):
        pass
    st = cache.layers[0]
    assert len(st.groups) == 1 and st.groups[0].heads.tolist() == [1]
    assert st.groups[0].k.shape[-1] == 16 * 2 // 8


def test_middle_ratio_for_leank70_kivi2_is_at_least_8x():
    # 30 % of 64 channels kept (align 16 -> 16 kept), 2-bit K and V, group 32
    kept = torch.zeros(30, 3, 64, dtype=torch.bool)
    kept[..., 48:] = True
    policy = CachePolicy(mask=Mask(kept), k_bits=2, v_bits=2)
    args = args_for(30, 3, 64)
    b = planned_nbytes(policy, args, 8192)
    _, middle = region_sizes(policy, 8192)
    fp16_middle = 2 * 30 * 3 * 64 * 2 * middle
    assert fp16_middle / (b.middle_k + b.middle_v + b.scales) >= 8


def test_compress_cache_equals_prefilling_compressed(tiny_llama):
    import leank
    from leank.runtime.cache.compressed import compress_cache

    m = leank.load(tiny_llama, device="cpu")
    mask = random_mask(m.args.n_layers, m.args.n_kv_heads, m.args.head_dim, align=4)
    policy = CachePolicy(mask=mask, k_bits=2, v_bits=4, sink_tokens=4, recent_tokens=16, block_tokens=32, group_size=16)
    ids = m.tokenize("the rain in spain stays mainly in the plain " * 12)
    follow = m.tokenize(" and the sun", add_special=False)
    direct = m.new_cache(policy=policy)
    dense = m.new_cache()
    with torch.inference_mode():
        m.transformer(torch.tensor([ids]), direct)
        m.transformer(torch.tensor([ids]), dense)
        converted = compress_cache(dense, policy, m.args)
        a = m.transformer(torch.tensor([follow]), direct, logits_for="all")
        b = m.transformer(torch.tensor([follow]), converted, logits_for="all")
    assert converted.layers[0].middle_len > 0
    assert torch.equal(a, b)
