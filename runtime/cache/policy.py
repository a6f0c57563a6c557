"""The cache policy: how a model's KV cache is compressed. One type, used by the runtime, the converter
and the CLI (which builds it from user choices through `leank.masks.choose.build_policy`).

Tokens live in two regions per layer:
- full precision: the first `sink_tokens`, the last `recent_tokens`, and the block being filled;
- middle: everything between, entering `block_tokens` at a time. Middle K keeps only the channels
  `mask` keeps (LeanK); middle K and V may be quantized to `k_bits`/`v_bits` (KIVI: K per channel over
  groups of `group_size` tokens, V per token over groups of `group_size` channels). 16 bits = not
  quantized (stored exactly, in the compute dtype: float16/bfloat16 on GPU, float32 on CPU).
`rotate` turns K and V by orthonormal Hadamard transforms before they are stored (V over each head's
channels, K within each head's kept channels), so that quantization meets no outlier channel;
attention is unchanged in exact arithmetic (see `leank.runtime.cache.compressed`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from leank.errors import LeankError
from leank.kernels.quant import BITS
from leank.runtime import defaults
from leank.runtime.cache.mask import Mask

KINDS = ("dense", "leank", "kivi", "leank+kivi")


@dataclass(frozen=True)
class CachePolicy:
    mask: Mask | None = None  # None: every channel kept (no pruning)
    k_bits: int = 16
    v_bits: int = 16
    group_size: int = defaults.GROUP_SIZE
    sink_tokens: int = defaults.SINK_TOKENS
    recent_tokens: int = defaults.RECENT_TOKENS
    block_tokens: int = defaults.BLOCK_TOKENS
    rotate: bool = False

    @property
    def is_dense(self) -> bool:
        """No compression at all: the runtime uses the plain dense cache."""
        return self.mask is None and self.k_bits == 16 and self.v_bits == 16

    @property
    def kind(self) -> str:
        quant = self.k_bits < 16 or self.v_bits < 16
        if self.mask is None:
            return "kivi" if quant else "dense"
        return "leank+kivi" if quant else "leank"

    def replace(self, **changes) -> "CachePolicy":
        return replace(self, **changes)

    def validate(self, n_layers: int | None = None, n_kv_heads: int | None = None, head_dim: int | None = None,
                 context_length: int | None = None) -> "CachePolicy":
        """Raise `LeankError` for an impossible policy (before any work starts); returns self."""
        if self.k_bits not in BITS or self.v_bits not in BITS:
            raise LeankError(f"bits must be one of {', '.join(map(str, BITS))} (16 = not quantized); got k {self.k_bits}, v {self.v_bits}")
        for name in ("group_size", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LeankError(f"{name} must be a positive integer, got {value!r}")
        for name in ("sink_tokens", "recent_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise LeankError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.rotate, bool):
            raise LeankError(f"rotate must be True or False, got {self.rotate!r}")
        if self.rotate and head_dim is not None and head_dim & (head_dim - 1):
            raise LeankError(f"rotate needs a power-of-2 head_dim (Hadamard transform), got {head_dim}")
        if self.block_tokens % self.group_size:
            raise LeankError(f"block_tokens ({self.block_tokens}) must be a multiple of group_size ({self.group_size}): "
                             "K is quantized over groups of group_size tokens")
        if head_dim is not None and head_dim % self.group_size and self.v_bits < 16:
            raise LeankError(f"group_size {self.group_size} does not divide head_dim {head_dim}: "
                             "V is quantized per token over groups of group_size channels")
        if self.mask is not None and n_layers is not None:
            self.mask.check_fits(n_layers, n_kv_heads, head_dim)
        if context_length is not None and self.sink_tokens + self.recent_tokens > context_length:
            raise LeankError(f"sink ({self.sink_tokens}) + recent ({self.recent_tokens}) tokens exceed the context "
                             f"of {context_length}: nothing would ever be compressed")
        return self

    def describe(self) -> str:
        parts = [self.kind]
        if self.mask is not None:
            parts.append(f"{100 * (1 - self.mask.kept_fraction):.0f}% K channels pruned ({self.mask.provenance.method})")
        if self.k_bits < 16 or self.v_bits < 16:
            parts.append(f"K {self.k_bits}-bit, V {self.v_bits}-bit, group {self.group_size}"
                         + (", Hadamard-rotated" if self.rotate else ""))
        if not self.is_dense:
            parts.append(f"sink {self.sink_tokens}, recent {self.recent_tokens}, block {self.block_tokens}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "k_bits": self.k_bits,
            "v_bits": self.v_bits,
            "group_size": self.group_size,
            "sink_tokens": self.sink_tokens,
            "recent_tokens": self.recent_tokens,
            "block_tokens": self.block_tokens,
            "rotate": self.rotate,
            "mask": None if self.mask is None else self.mask.stats(),
        }
