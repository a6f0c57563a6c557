"""Scores to a binary mask, as LeanK's stage 2 does: one global cut, then per-head aligned counts.

1. Global cut: the `1 - ratio` highest-scoring channels of the whole model are "in". This is the
   quantile threshold at `ratio` made exact: ties (clamped scaling factors are often exactly 0 or 1)
   are broken by position instead of letting a tie at the threshold keep or drop a whole plateau.
2. Each head's count of "in" channels is rounded to the nearest multiple of `align` (halves round up),
   so that a kernel can treat heads with the same count as one dense group.
3. Each head keeps its top-scoring channels, that many of them.

`binarize_scores` is plain tensor code (sorts and comparisons, no loop over heads), so mask training
can call it every step on the GPU; `straight_through_mask` adds the gradient path of a straight-through
estimator. `binarize` is the user-facing wrapper: it also rejects non-finite scores and returns a `Mask`.
"""
from __future__ import annotations

import torch

from leank.errors import LeankError
from leank.runtime import defaults
from leank.runtime.cache.mask import ALIGNMENTS, Mask, Provenance


def check_binarize_args(shape: tuple[int, ...], ratio: float, align: int) -> None:
    """Raise `LeankError` unless `ratio` and `align` make sense for scores of `shape` (..., head_dim)."""
    if len(shape) < 1 or 0 in shape:
        raise LeankError(f"scores must be a non-empty (layers, kv_heads, head_dim) tensor, got shape {tuple(shape)}")
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise LeankError(f"the pruning ratio must be within [0, 1], got {ratio!r}")
    if align not in ALIGNMENTS:
        raise LeankError(f"align must be one of {', '.join(map(str, ALIGNMENTS))}, got {align!r}")
    if shape[-1] % align:
        raise LeankError(f"align {align} does not divide head_dim {shape[-1]}")


def _descending_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element along the last dimension, 0 = largest; ties go to the lower index."""
    order = torch.argsort(x, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def aligned_counts(scores: torch.Tensor, ratio: float, align: int) -> torch.Tensor:
    """Kept channels per head (..., ) after the global cut at `ratio` and rounding to `align`."""
    check_binarize_args(tuple(scores.shape), ratio, align)
    s = scores.detach().float()
    n = s.numel()
    n_in = int(round((1.0 - float(ratio)) * n))
    inside = (_descending_ranks(s.reshape(-1)) < n_in).reshape(s.shape)
    counts = inside.sum(-1)
    return torch.div(counts + align // 2, align, rounding_mode="floor") * align


def binarize_scores(scores: torch.Tensor, ratio: float, align: int = defaults.ALIGN) -> torch.Tensor:
    """Bool mask of `scores`' shape (layers, kv_heads, head_dim), on its device, pruning `ratio`."""
    counts = aligned_counts(scores, ratio, align)
    return _descending_ranks(scores.detach().float()) < counts[..., None]


def straight_through_mask(scores: torch.Tensor, ratio: float, align: int = defaults.ALIGN) -> torch.Tensor:
    """The binary mask as floats whose gradient flows to `scores` unchanged (straight-through estimator).

    Forward: exactly `binarize_scores(...)` as 0.0/1.0 in `scores`' dtype. Backward: identity.
    """
    hard = binarize_scores(scores, ratio, align).to(scores.dtype)
    return hard + (scores - scores.detach())


def binarize(scores: torch.Tensor, ratio: float, align: int = defaults.ALIGN, method: str = "scores", source: str = "",
             steps: int | None = None, **extra) -> Mask:
    """`binarize_scores` wrapped as a `Mask` whose provenance records how it was made."""
    if scores.dim() != 3:
        raise LeankError(f"scores must be (layers, kv_heads, head_dim), got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise LeankError("scores must be finite (no NaN or infinity)")
    kept = binarize_scores(scores, ratio, align).cpu()
    return Mask(kept, Provenance(method, ratio=float(ratio), align=int(align), source=source, steps=steps, extra=extra))
