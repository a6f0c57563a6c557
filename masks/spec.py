"""Turn a mask SPEC from the command line into a `Mask` for a given model.

SPEC is one of:
- a native mask file (`.safetensors`, written by `leank mask` commands or `Mask.save`);
- `freq:RATIO` (training-free, RoPE frequencies), e.g. `freq:0.7`;
- `ones` (keep every channel: the compressed cache without pruning).
"""
from __future__ import annotations

from pathlib import Path

from leank.errors import LeankError
from leank.masks.mask import Mask

DEFAULT_ALIGN = 16


def _ratio(text: str, spec: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise LeankError(f"mask spec {spec!r}: {text!r} is not a ratio like 0.7") from None
    if not 0.0 <= r <= 1.0:
        raise LeankError(f"mask spec {spec!r}: the ratio must be within [0, 1]")
    return r


def resolve_mask(spec: str, model, align: int | None = None) -> Mask:
    """The mask `spec` names, checked against `model`'s shape (a `leank.Model`)."""
    args = model.args
    align = align or DEFAULT_ALIGN
    if spec == "ones":
        mask = Mask.ones(args.n_layers, args.n_kv_heads, args.head_dim)
    elif spec.startswith("freq:"):
        from leank.masks.freq import frequency_mask

        mask = frequency_mask(args, _ratio(spec[5:], spec), align)
    else:
        path = Path(spec)
        if not path.exists():
            raise LeankError(f"mask {spec!r}: no such file, and not freq:RATIO or ones")
        mask = Mask.load(path)
    mask.check_fits(args.n_layers, args.n_kv_heads, args.head_dim, f"{model.path.name}")
    return mask
