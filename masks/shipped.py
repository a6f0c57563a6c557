"""Learned masks shipped with leank (`masks/data/`), found by the model's K-projection fingerprint.

Shipped: SmolLM2-135M-Instruct (the default model), ratios 0.7 and 0.5, align 16, trained with
`leank mask train` (see bench/RESULTS.md for the command, the card and the evaluation).
"""
from __future__ import annotations

from pathlib import Path

from leank.runtime import defaults
from leank.runtime.cache.mask import Mask
from leank.runtime.gguf.schema import k_fingerprint

DATA = Path(__file__).parent / "data"


def shipped_masks(model) -> list[Mask]:
    """Every shipped mask made for this exact model (same K projections)."""
    if not DATA.is_dir():
        return []

    found, fingerprint = [], None
    for path in sorted(DATA.glob("*.safetensors")):
        mask = Mask.load(path)
        if mask.shape != (model.args.n_layers, model.args.n_kv_heads, model.args.head_dim):
            continue
        fingerprint = fingerprint or k_fingerprint(model.file)
        if mask.provenance.extra.get("fingerprint") == fingerprint:
            found.append(mask)
    return found


def shipped_mask(model, ratio: float | None = None) -> Mask | None:
    """The shipped mask for this model whose pruning ratio is closest to `ratio` (default 0.7), or None."""
    target = defaults.RATIO if ratio is None else ratio
    masks = shipped_masks(model)
    return min(masks, key=lambda m: abs((m.provenance.ratio or 0.0) - target)) if masks else None
