"""The KV cache interface the model talks to, its byte accounting, and the attention every cache shares.

A cache holds every layer's past keys and values. The model calls, per layer and forward pass:

    cache.append(layer, k, v)      # the new tokens' keys/values, (B, Hkv, T, D), RoPE applied
    out = cache.attend(layer, q)   # queries of those T tokens, (B, Hq, T, D): causal attention over
                                   # everything the layer holds -> (B, Hq, T, D)

and `cache.seq_len` before a pass to learn the position of its first token. `nbytes()` reports the
memory the cache holds, from its real tensors. Compressed caches (`leank.runtime.cache.compressed`)
implement the same interface; `attend` is where they may move tokens out of full precision, since the
new tokens' dense keys are no longer needed once their queries have attended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leank.kernels import cpu as cpu_kernels

# Queries attended at once during a long prefill: bounds the (queries x keys) score matrix.
QUERY_CHUNK = 1024


@dataclass
class CacheBytes:
    """Where a cache's bytes are. All counts come from the tensors themselves."""

    tokens: int
    full: int = 0  # full-precision K and V (a dense cache; sink + recent in a compressed one)
    middle_k: int = 0  # pruned/quantized middle-region K (codes or fp16 values)
    middle_v: int = 0
    scales: int = 0  # KIVI scales and mins
    fp16_equivalent: int = 0  # what an fp16 dense cache would take for the same tokens
    allocated: int = 0  # including spare capacity reserved for growth
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.full + self.middle_k + self.middle_v + self.scales

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    @property
    def ratio(self) -> float:
        """fp16 dense bytes / these bytes (how many times smaller than an fp16 cache)."""
        return self.fp16_equivalent / self.total if self.total else float("nan")

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "total": self.total,
            "full": self.full,
            "middle_k": self.middle_k,
            "middle_v": self.middle_v,
            "scales": self.scales,
            "fp16_equivalent": self.fp16_equivalent,
            "allocated": self.allocated,
            "bytes_per_token": self.bytes_per_token,
            "ratio_vs_fp16": self.ratio,
            **self.extra,
        }


class KVCache:
    """The interface every cache implements (see the module docstring)."""

    n_layers: int
    batch: int

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> CacheBytes:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


def grow(buf: torch.Tensor | None, used: int, needed: int, shape_fn, dim: int) -> torch.Tensor:
    """Return a buffer with room for `needed` entries along `dim`, keeping the first `used`.

    Capacity grows geometrically so appending n tokens one at a time costs O(n) copies in total.
    """
    cap = 0 if buf is None else buf.shape[dim]
    if needed <= cap:
        return buf
    new_cap = max(needed, int(cap * 1.5) + 16)
    new = shape_fn(new_cap)
    if buf is not None and used:
        new.narrow(dim, 0, used).copy_(buf.narrow(dim, 0, used))
    return new


def write_token(buf: torch.Tensor, at: torch.Tensor, x: torch.Tensor) -> None:
    """buf[:, :, at] = x for one token x (B, H, 1, D) of every row, `at` (B,) int64 on the device (every row
    of these caches holds the same length: row 0's index serves all). One kernel, no host read: a
    captured step's append (`leank.runtime.graph`)."""
    buf.index_copy_(2, at[:1], x.to(buf.dtype))


def kv_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """What a cache stores unquantized K and V in: float16 for a float32 model on a CPU, else the compute
    dtype. float16 halves the bytes of float32, and is what llama.cpp's default f16 cache and a GPU user
    hold; the C attention kernels read it and sum in float32 (`leank.kernels.cpu`)."""
    return torch.float16 if torch.device(device).type == "cpu" and dtype == torch.float32 else dtype


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of the last T positions' queries q (B, Hq, T, D) over keys/values (B, Hkv, S, D).

    Query t sits at position S - T + t and sees keys 0 .. S - T + t. GQA: query head h uses KV head
    h // (Hq // Hkv), as llama.cpp does.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    gqa = Hq != Hkv
    if T == 1:  # decode: the query sees every key; C kernels on a float32 CPU, else SDPA
        out = cpu_kernels.decode_attention(q, k, v, scale)
        if out is not None:
            return out
    k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 CPU cache under float32 queries (`kv_dtype`)
    if T == 1 and q.is_cuda:
        # two batched matmuls over each KV head's query heads: SDPA picks cuDNN here, which plans again for
        # every new length (8.4 ms of CPU a call on an H200 machine, torch 2.11: 36 ms a step of 4 layers)
        s = torch.matmul(q.reshape(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2)).float().mul_(scale)
        return torch.matmul(torch.softmax(s, -1).to(v.dtype), v).view(B, Hq, 1, D)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    past = S - T
    out = torch.empty_like(q)
    for i0 in range(0, T, QUERY_CHUNK):
        i1 = min(T, i0 + QUERY_CHUNK)
        kk, vv = k[:, :, : past + i1], v[:, :, : past + i1]
        if past == 0 and i0 == 0:
            out[:, :, i0:i1] = F.scaled_dot_product_attention(q[:, :, i0:i1], kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            rows = torch.arange(past + i0, past + i1, device=q.device)[:, None]
            mask = torch.arange(past + i1, device=q.device)[None, :] <= rows
            out[:, :, i0:i1] = F.scaled_dot_product_attention(q[:, :, i0:i1], kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out
