"""Attention over the compressed cache layout, in torch: the CPU path and the GPU kernels' reference.

Layout of one layer (see `leank.runtime.cache.compressed` for how tokens get there):
- full region: K and V (B, Hkv, F, D) in the compute dtype: the sink tokens, then the recent ones;
  the queries' own tokens are its last T entries (causal inside it);
- middle region, per head group (KV heads that keep the same number c > 0 of K channels):
  `MiddleGroup` with K of kept channels only and V of all channels, quantized (KIVI) or, at 16 bits,
  unquantized in the compute dtype.
Heads that keep no channel have no group: they attend to the full region only.
One softmax spans both regions; partial results merge by log-sum-exp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leank.kernels.quant import dequantize_k, dequantize_v

MIDDLE_CHUNK = 4096  # middle tokens dequantized at a time (a multiple of every group size we allow)


@dataclass
class MiddleGroup:
    """Middle-region storage of the KV heads `heads` that each keep `channels.shape[1]` K channels.

    k: (B, nh, cap, wk) uint8 packed codes, or (B, nh, cap, c) in the compute dtype when k_bits == 16
    k_scale, k_min: (B, nh, cap // group, c) float16 (None when k_bits == 16)
    v: (B, nh, cap, wv) uint8 packed codes, or (B, nh, cap, D) in the compute dtype when v_bits == 16
    v_scale, v_min: (B, nh, cap, D // group) float16 (None when v_bits == 16)
    """

    heads: torch.Tensor  # (nh,) long, KV head indices
    channels: torch.Tensor  # (nh, c) long, kept channel indices of each head (ascending)
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_min: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_min: torch.Tensor | None = None

    @property
    def n_channels(self) -> int:
        return self.channels.shape[1]


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x (B, nh, ..., D), channels (nh, c) -> (B, nh, ..., c)."""
    idx = channels.view(1, channels.shape[0], *([1] * (x.dim() - 3)), channels.shape[1])
    return torch.gather(x, -1, idx.expand(*x.shape[:-1], channels.shape[1]))


def dequant_middle_k(g: MiddleGroup, start: int, end: int, bits: int, group: int, dtype=torch.float32) -> torch.Tensor:
    """Middle K of tokens [start, end) (multiples of `group`), kept channels: (B, nh, end-start, c)."""
    if bits == 16:
        return g.k[:, :, start:end].to(dtype)
    return dequantize_k(g.k[:, :, start:end], g.k_scale[:, :, start // group : end // group],
                        g.k_min[:, :, start // group : end // group], bits, group, g.n_channels, dtype)


def dequant_middle_v(g: MiddleGroup, start: int, end: int, bits: int, group: int, head_dim: int,
                     dtype=torch.float32) -> torch.Tensor:
    """Middle V of tokens [start, end): (B, nh, end-start, D)."""
    if bits == 16:
        return g.v[:, :, start:end].to(dtype)
    return dequantize_v(g.v[:, :, start:end], g.v_scale[:, :, start:end], g.v_min[:, :, start:end], bits, group,
                        head_dim, dtype)


def full_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       key_lens: torch.Tensor | None = None):
    """Grouped queries q (B, Hkv, R, T, D) over k, v (B, Hkv, S, D); the T queries are the last T keys'
    positions (causal). Returns o (B, Hkv, R, T, D) float32 and lse (B, Hkv, R, T).

    `key_lens` (B,) gives each sequence's valid key count (T must be 1 then)."""
    B, H, R, T, D = q.shape
    S = k.shape[2]
    scores = torch.matmul(q.float().reshape(B, H, R * T, D), k.float().transpose(-1, -2)).view(B, H, R, T, S) * scale
    if T > 1:
        qpos = torch.arange(S - T, S, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(S, device=q.device)[None, :] > qpos, float("-inf"))
    vf = v.float()
    if key_lens is not None:
        invalid = torch.arange(S, device=q.device)[None, :] >= key_lens[:, None]  # (B, S)
        scores = scores.masked_fill(invalid[:, None, None, None, :], float("-inf"))
        # keys past a sequence's length may be anything (a capacity buffer's spare rows): 0 * NaN is NaN
        vf = vf.masked_fill(invalid[:, None, :, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    o = torch.matmul(p.view(B, H, R * T, S), vf).view(B, H, R, T, D)
    return o, lse


def middle_attention_lse(q: torch.Tensor, g: MiddleGroup, length: int, k_bits: int, v_bits: int, group: int,
                         scale: float, lens: torch.Tensor | None = None, chunk: int = MIDDLE_CHUNK):
    """Grouped queries q (B, Hkv, R, T, D) over the middle tokens [0, length) of group `g`.

    Returns o (B, nh, R, T, D) float32 and lse (B, nh, R, T) for the group's heads; every middle token
    precedes every query. `lens` (B,) limits each sequence to its own middle length.
    """
    B, _, R, T, D = q.shape
    nh, c = g.channels.shape
    qc = gather_channels(q[:, g.heads].float(), g.channels).reshape(B, nh, R * T, c)
    m = torch.full((B, nh, R * T), float("-inf"), device=q.device)
    l = torch.zeros((B, nh, R * T), device=q.device)
    acc = torch.zeros((B, nh, R * T, D), device=q.device)
    for s0 in range(0, length, chunk):
        s1 = min(length, s0 + chunk)
        kc = dequant_middle_k(g, s0, s1, k_bits, group)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, nh, Q, n)
        vc = dequant_middle_v(g, s0, s1, v_bits, group, D)
        if lens is not None:
            invalid = torch.arange(s0, s1, device=q.device)[None, :] >= lens[:, None]
            scores = scores.masked_fill(invalid[:, None, None, :], float("-inf"))
            vc = vc.masked_fill(invalid[:, None, :, None], 0.0)  # spare rows may dequantize to NaN
        m_new = torch.maximum(m, scores.amax(-1))
        m_safe = m_new.clamp_min(-1e30)  # all -inf so far: keep exp() finite
        p = torch.exp(scores - m_safe.unsqueeze(-1))
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vc)
        m = m_new
    o = acc / l.clamp_min(1e-30).unsqueeze(-1)
    lse = m + torch.log(l)  # -inf where nothing was attended
    return o.view(B, nh, R, T, D), lse.view(B, nh, R, T)


def merge_lse(o1, lse1, o2, lse2):
    """Combine two partial softmax results over disjoint key sets."""
    lse = torch.logaddexp(lse1, lse2)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - lse_safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse_safe).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def compressed_attention(q: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor, groups: list[MiddleGroup],
                         middle_len: int, k_bits: int, v_bits: int, group: int, scale: float | None = None,
                         full_lens: torch.Tensor | None = None, middle_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over one layer's compressed cache -> (B, Hq, T, D) in q's dtype.

    `full_lens`/`middle_lens` (B,) give per-sequence lengths for a batch of unequal sequences (T == 1);
    without them every sequence holds `full_k.shape[2]` full and `middle_len` middle tokens. With them,
    `full_k.shape[2]` and `middle_len` may be capacities: what lies past a sequence's length is never used.
    """
    B, Hq, T, D = q.shape
    Hkv = full_k.shape[1]
    R = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.view(B, Hkv, R, T, D)
    o, lse = full_attention_lse(qg, full_k, full_v, scale, full_lens)
    if middle_len > 0:
        for g in groups:
            og, lg = middle_attention_lse(qg, g, middle_len, k_bits, v_bits, group, scale, middle_lens)
            merged, _ = merge_lse(o[:, g.heads], lse[:, g.heads], og, lg)
            o[:, g.heads] = merged
    return o.view(B, Hq, T, D).to(q.dtype)
