"""On a CPU the caches hold unquantized K and V in float16, as llama.cpp's default cache and a GPU do."""
import torch

from leank.runtime.cache.base import kv_dtype
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.plan import kv_summary, planned_nbytes
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.cache.mask import Mask


class Args:
    n_layers, n_kv_heads, head_dim = 2, 2, 64

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


def test_cpu_float32_model_stores_float16_and_says_so():
    assert kv_dtype("cpu", torch.float32) == torch.float16
    assert kv_dtype("cpu", torch.bfloat16) == torch.bfloat16
    dense = DenseCache(2, 2, 64)
    k = torch.randn(1, 2, 40, 64)
    for layer in range(2):
        dense.append(layer, k, k)
    assert dense.k[0].dtype == torch.float16
    b = dense.nbytes()
    assert b.full == b.fp16_equivalent and b.ratio == 1.0
    # attention reads the float16 copy and returns float32
    q = torch.randn(1, 4, 1, 64)
    out = dense.attend(0, q)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    kh = k.half().float().repeat_interleave(2, 1)
    ref = torch.softmax(q @ kh.transpose(-1, -2) / 8, -1) @ kh
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_a_pruned_cache_is_smaller_than_fp16_dense_on_cpu():
    kept = torch.zeros(2, 2, 64, dtype=torch.bool)
    kept[:, :, :16] = True  # 75 % of K channels pruned, V kept: as `--kv leank` does by default
    policy = CachePolicy(mask=Mask(kept), sink_tokens=4, recent_tokens=16, block_tokens=8, group_size=8)
    cache = CompressedCache(policy, Args())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for layer in range(2):
            kv = torch.randn(1, 2, 50, 64, generator=gen)
            cache.append(layer, kv, kv)
            cache.attend(layer, torch.randn(1, 4, 50, 64, generator=gen))
    b = cache.nbytes()
    assert cache.layers[0].full_k.dtype == torch.float16 and cache.layers[0].middle_len > 0
    assert b.ratio > 1.0  # smaller than an fp16 dense cache of the same tokens
    plan = planned_nbytes(policy, Args(), 150, full_bytes_per_element=2)
    assert (plan.full, plan.middle_k, plan.middle_v) == (b.full, b.middle_k, b.middle_v)
    summary = kv_summary(policy, Args(), 4096)
    print(summary)
    assert summary["ratio_vs_fp16"] > 1.0
