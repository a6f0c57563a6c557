"""What a cache will cost before anything is allocated: region sizes and bytes under a policy, computed
from the policy and the model's shapes alone (`leank info`, the memory planner). `CompressedCache.nbytes()`
reports the same numbers from its real tensors; the tests hold the two equal."""
from __future__ import annotations

from leank.kernels.quant import packed_width
from leank.runtime.cache.base import CacheBytes
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.policy import CachePolicy


def region_sizes(policy: CachePolicy, n_tokens: int) -> tuple[int, int]:
    """(full, middle) token counts of a layer holding `n_tokens` (compaction is deterministic)."""
    over = n_tokens - policy.sink_tokens - policy.recent_tokens
    middle = max(0, over // policy.block_tokens * policy.block_tokens)
    return n_tokens - middle, middle


def planned_nbytes(policy: CachePolicy, args, n_tokens: int, batch: int = 1, full_bytes_per_element: int = 2) -> CacheBytes:
    """The bytes `CompressedCache.nbytes()` reports after `n_tokens`, computed without any tensor.

    `full_bytes_per_element`: 2 for a float16/bfloat16 full region (the default on CPU and GPU), 4 for
    float32 (a float32 model on a GPU).
    """
    full, middle = region_sizes(policy, n_tokens)
    H, D, G = args.n_kv_heads, args.head_dim, policy.group_size
    mask = policy.mask if policy.mask is not None else Mask.ones(args.n_layers, H, D)
    out = CacheBytes(tokens=n_tokens)
    per_layer_full = 2 * batch * H * D * full_bytes_per_element * full
    counts = mask.kept_counts()
    for layer in range(args.n_layers):
        out.full += per_layer_full
        for h in range(H):
            c = int(counts[layer, h])
            if c == 0:
                continue
            kb = c * full_bytes_per_element if policy.k_bits == 16 else packed_width(c, policy.k_bits)
            vb = D * full_bytes_per_element if policy.v_bits == 16 else packed_width(D, policy.v_bits)
            out.middle_k += batch * middle * kb
            out.middle_v += batch * middle * vb
            if policy.k_bits < 16:
                out.scales += batch * (middle // G) * c * 2 * 2
            if policy.v_bits < 16:
                out.scales += batch * middle * (D // G) * 2 * 2
        out.fp16_equivalent += 2 * batch * H * D * 2 * n_tokens
    out.extra["middle_tokens"] = middle
    out.extra["full_tokens"] = full
    return out


def kv_summary(policy, args, ctx: int, full_bytes_per_element: int = 2) -> dict:
    """Bytes per token for `policy` at `ctx` tokens, against an fp16 dense cache."""
    fp16_per_token = args.kv_bytes_per_token(2)
    if policy.is_dense:
        total = args.kv_bytes_per_token(full_bytes_per_element) * ctx
        middle_ratio = None
        middle_per_token = None
    else:
        b = planned_nbytes(policy, args, ctx, full_bytes_per_element=full_bytes_per_element)
        total = b.total
        _, middle = region_sizes(policy, ctx)
        mid_bytes = b.middle_k + b.middle_v + b.scales
        middle_per_token = mid_bytes / middle if middle else None
        middle_ratio = fp16_per_token / middle_per_token if middle_per_token else None
    return {
        "context": ctx,
        "policy": policy.describe(),
        "fp16_bytes_per_token": fp16_per_token,
        "fp16_bytes": fp16_per_token * ctx,
        "bytes": total,
        "bytes_per_token": total / ctx,
        "ratio_vs_fp16": fp16_per_token * ctx / total if total else float("nan"),
        "middle_bytes_per_token": middle_per_token,
        "middle_ratio_vs_fp16": middle_ratio,
        "full_region_bytes_per_element": full_bytes_per_element,
    }


def sequence_nbytes(policy: CachePolicy | None, args, n_tokens: int, full_bytes_per_element: int = 2) -> int:
    """The bytes one sequence's cache stores at `n_tokens` under `policy` (None or dense: a dense cache).

    Stored tokens only, as `nbytes().total` reports them: spare capacity a growing buffer keeps is not
    counted (at most half a buffer more while it grows)."""
    if policy is None or policy.is_dense:
        return args.kv_bytes_per_token(full_bytes_per_element) * n_tokens
    return planned_nbytes(policy, args, n_tokens, full_bytes_per_element=full_bytes_per_element).total
