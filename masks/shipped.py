"""Learned masks shipped with leank, found by the model's K-projection fingerprint."""
from __future__ import annotations

from pathlib import Path

from leank.masks.mask import Mask

DATA = Path(__file__).parent / "data"


def shipped_mask(model) -> Mask | None:
    """The learned mask shipped for this exact model (same K projections), or None."""
    if not DATA.is_dir():
        return None
    from leank.convert.schema import k_fingerprint

    fingerprint = None
    for path in sorted(DATA.glob("*.safetensors")):
        mask = Mask.load(path)
        if mask.shape != (model.args.n_layers, model.args.n_kv_heads, model.args.head_dim):
            continue
        fingerprint = fingerprint or k_fingerprint(model.file)
        if mask.provenance.extra.get("fingerprint") == fingerprint:
            return mask
    return None
