"""Training-free masks from RoPE frequencies: keep each head's lowest-frequency channel pairs.

Low-frequency pairs rotate slowly and carry most of the content signal over long distances; the fast
pairs mostly encode nearby position, which the full-precision recent window still serves. LeanK's learned
masks keep mostly low-frequency channels too; this mask is the prior without training.
"""
from __future__ import annotations

import math

import torch

from leank.errors import LeankError
from leank.runtime import defaults
from leank.runtime.cache.mask import ALIGNMENTS, Mask, Provenance
from leank.runtime.model.rope import inverse_frequencies, rope_mode


def kept_per_head(head_dim: int, ratio: float, align: int) -> int:
    """Channels kept per head when pruning `ratio` of them, rounded to a multiple of `align`."""
    if not 0.0 <= ratio <= 1.0:
        raise LeankError(f"ratio must be within [0, 1], got {ratio}")
    if align not in ALIGNMENTS:
        raise LeankError(f"align must be one of {ALIGNMENTS}, got {align}")
    if head_dim % align:
        raise LeankError(f"align {align} does not divide head_dim {head_dim}")
    # halves round up, as `leank.masks.binarize` rounds each head's count
    return int(math.floor((1.0 - ratio) * head_dim / align + 0.5)) * align


def frequency_mask(args, ratio: float, align: int = defaults.ALIGN) -> Mask:
    """Every head keeps the same lowest-frequency channels, `ratio` of them pruned (aligned)."""
    d = args.head_dim
    keep = kept_per_head(d, ratio, align)
    if keep % 2:
        raise LeankError("the kept channel count must be even (channels go in RoPE pairs)")
    inv = inverse_frequencies(args)  # (d/2,) per pair, decreasing with the pair index
    slowest = torch.argsort(inv, stable=True)[: keep // 2]  # pair indices, slowest first
    kept = torch.zeros(d, dtype=torch.bool)
    half = d // 2
    for i in slowest.tolist():
        if rope_mode(args.arch) == "interleaved":
            kept[2 * i] = kept[2 * i + 1] = True
        else:
            kept[i] = kept[i + half] = True
    full = kept.expand(args.n_layers, args.n_kv_heads, d).clone()
    return Mask(full, Provenance("freq", ratio=ratio, align=align, source="rope-frequency"))
