"""The one `Mask` type: which key-cache channels of each (layer, KV head) are kept for older tokens.

A mask is a bool tensor (layers, kv_heads, head_dim) in the model's GGUF channel order (see
`leank.runtime.model.rope` for what that order means per architecture), plus where it came from.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leank.errors import LeankError
from leank.runtime.outputs import atomic_write

ALIGNMENTS = (1, 8, 16, 32)


@dataclass(frozen=True)
class Provenance:
    """How a mask was made: method (learned, imported, calib, freq, ones), target ratio, alignment..."""

    method: str = "unknown"
    ratio: float | None = None  # target fraction of channels pruned
    align: int | None = None
    source: str = ""
    steps: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"method": self.method, "ratio": self.ratio, "align": self.align, "source": self.source, "steps": self.steps}
        d.update(self.extra)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Provenance":
        """From untrusted JSON: ValueError unless `d` is an object whose known fields have sane values."""
        if not isinstance(d, dict):
            raise ValueError(f"provenance must be a JSON object, not {type(d).__name__}")
        known = {"method", "ratio", "align", "source", "steps"}

        def number(key: str, integer: bool):
            v = d.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"provenance {key!r} must be a finite number, got {v!r:.40}")
            if integer and v != int(v):
                raise ValueError(f"provenance {key!r} must be a whole number, got {v!r}")
            return int(v) if integer else float(v)

        return cls(
            method=str(d.get("method", "unknown")),
            ratio=number("ratio", False),
            align=number("align", True),
            source=str(d.get("source", "")),
            steps=number("steps", True),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class Mask:
    """Kept K channels per (layer, KV head), bool (layers, kv_heads, head_dim), GGUF channel order."""

    kept: torch.Tensor
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self):
        k = self.kept
        if not isinstance(k, torch.Tensor) or k.dim() != 3:
            raise LeankError(f"a mask must be a 3-D tensor (layers, kv_heads, head_dim), got {getattr(k, 'shape', type(k))}")
        if k.dtype != torch.bool:
            object.__setattr__(self, "kept", k.to(torch.bool))
        object.__setattr__(self, "kept", self.kept.detach().cpu().contiguous())

    # --- shape ----------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.kept.shape)

    @property
    def n_layers(self) -> int:
        return self.kept.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kept.shape[1]

    @property
    def head_dim(self) -> int:
        return self.kept.shape[2]

    def check_fits(self, n_layers: int, n_kv_heads: int, head_dim: int, what: str = "the model") -> None:
        if self.shape != (n_layers, n_kv_heads, head_dim):
            raise LeankError(
                f"mask shape {self.shape} (layers, kv_heads, head_dim) does not fit {what} "
                f"({n_layers}, {n_kv_heads}, {head_dim})"
            )

    @classmethod
    def ones(cls, n_layers: int, n_kv_heads: int, head_dim: int) -> "Mask":
        return cls(torch.ones(n_layers, n_kv_heads, head_dim, dtype=torch.bool), Provenance("ones", 0.0, 1))

    def with_provenance(self, **changes) -> "Mask":
        return replace(self, provenance=replace(self.provenance, **changes))

    # --- statistics -----------------------------------------------------------------------------------
    def kept_counts(self) -> torch.Tensor:
        """(layers, kv_heads) number of kept channels."""
        return self.kept.sum(-1)

    @property
    def kept_fraction(self) -> float:
        return float(self.kept.float().mean())

    def heads_by_kept_count(self) -> dict[int, int]:
        return dict(sorted(Counter(self.kept_counts().flatten().tolist()).items()))

    @property
    def pruned_heads(self) -> int:
        """Heads with no kept channel: they store no middle K and no middle V."""
        return int((self.kept_counts() == 0).sum())

    def detected_align(self) -> int:
        """The largest alignment in ALIGNMENTS that every head's kept count is a multiple of."""
        counts = self.kept_counts()
        return next(a for a in sorted(ALIGNMENTS, reverse=True) if bool((counts % a == 0).all()))

    def stats(self) -> dict:
        n_heads = self.n_layers * self.n_kv_heads
        return {
            "shape": list(self.shape),
            "kept_fraction": self.kept_fraction,
            "pruned_fraction": 1 - self.kept_fraction,
            "heads_by_kept_count": {str(k): v for k, v in self.heads_by_kept_count().items()},
            "fully_pruned_heads": self.pruned_heads,
            "heads": n_heads,
            # middle-region savings against full-precision K/V of the same tokens
            "k_saving": 1 - self.kept_fraction,
            "v_saving": self.pruned_heads / n_heads if n_heads else 0.0,
            "provenance": self.provenance.as_dict(),
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and self.shape == other.shape and bool(torch.equal(self.kept, other.kept))

    def __hash__(self) -> int:
        return hash((self.shape, self.kept.numpy().tobytes()))

    # --- files ----------------------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = True, inputs=()) -> None:
        """Write a native mask file (safetensors: a uint8 tensor plus JSON provenance)."""
        meta = {"format": "leank-mask", "version": "1", "provenance": json.dumps(self.provenance.as_dict())}
        with atomic_write(path, force=force, inputs=inputs) as tmp:
            save_file({"kept": self.kept.to(torch.uint8)}, str(tmp), metadata=meta)
            tmp.chmod(0o644)  # safetensors creates files private to the owner; a mask is not a secret

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        """Read a native mask file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise LeankError(f"{path}: no such mask file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "leank-mask" or "kept" not in f.keys():
                    raise LeankError(f"{path}: not a leank mask file")
                kept = f.get_tensor("kept")
        except LeankError:
            raise
        except Exception as e:
            raise LeankError(f"{path}: not a readable mask file (not safetensors, or damaged)") from e
        if kept.dim() != 3 or kept.numel() == 0 or kept.dtype != torch.uint8 or bool((kept > 1).any()):
            raise LeankError(f"{path}: the mask tensor must be 3-D uint8 of 0/1 values")
        try:
            prov = Provenance.from_dict(json.loads(meta.get("provenance", "{}")))
        except RecursionError:
            raise LeankError(f"{path}: damaged provenance (JSON nested too deeply)") from None
        except (ValueError, TypeError) as e:
            raise LeankError(f"{path}: damaged provenance ({e})") from e
        return cls(kept.bool(), prov)
