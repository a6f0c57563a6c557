"""The cache policy: how a model's KV cache is compressed. One type, used by the runtime, the converter
and the CLI.

Tokens live in two regions per layer:
- full precision: the first `sink_tokens`, the last `recent_tokens`, and the block being filled;
- middle: everything between, entering `block_tokens` at a time. Middle K keeps only the channels
  `mask` keeps (LeanK); middle K and V may be quantized to `k_bits`/`v_bits` (KIVI: K per channel over
  groups of `group_size` tokens, V per token over groups of `group_size` channels). 16 bits = not
  quantized (stored exactly, in the compute dtype: float16/bfloat16 on GPU, float32 on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from leank.errors import LeankError
from leank.masks.mask import Mask

BITS = (2, 4, 8, 16)
KINDS = ("dense", "leank", "kivi", "leank+kivi")

# Paper defaults (LeanK: sink 128, recent 768; KIVI: group 32), with the recent window shortened for
# short-context models so that compression starts within reach of their context (see README, "Defaults").
DEFAULT_SINK = 128
DEFAULT_RECENT = 768
DEFAULT_BLOCK = 32
DEFAULT_GROUP = 32


def default_recent(context_length: int) -> int:
    """768 tokens (LeanK) for long-context models, less when the context is short."""
    if context_length >= 32768:
        return DEFAULT_RECENT
    return max(DEFAULT_BLOCK, min(DEFAULT_RECENT, (context_length // 16) // DEFAULT_BLOCK * DEFAULT_BLOCK))


@dataclass(frozen=True)
class CachePolicy:
    mask: Mask | None = None  # None: every channel kept (no pruning)
    k_bits: int = 16
    v_bits: int = 16
    group_size: int = DEFAULT_GROUP
    sink_tokens: int = DEFAULT_SINK
    recent_tokens: int = DEFAULT_RECENT
    block_tokens: int = DEFAULT_BLOCK

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
            parts.append(f"K {self.k_bits}-bit, V {self.v_bits}-bit, group {self.group_size}")
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
            "mask": None if self.mask is None else self.mask.stats(),
        }


def policy_from_file(f, args) -> CachePolicy | None:
    """The policy embedded in a converted GGUF's `leank.*` metadata, or None for a plain file."""
    from leank.convert.schema import read_leank_metadata

    meta = read_leank_metadata(f, args)
    return None if meta is None else meta.policy


DEFAULT_KIVI_BITS = 2  # KIVI-2: the paper's headline setting; --k-bits/--v-bits 4 is nearly lossless
DEFAULT_RATIO = 0.7  # LeanK's pruning ratio


def build_policy(model, kv: str | None = None, mask: str | None = None, ratio: float | None = None,
                 k_bits: int | None = None, v_bits: int | None = None, group_size: int | None = None,
                 sink_tokens: int | None = None, recent_tokens: int | None = None,
                 block_tokens: int | None = None) -> CachePolicy:
    """The policy for `model` from user choices; unset choices fall back to the file, then the defaults.

    kv=None keeps what the file embeds (dense for a plain file), with any explicit setting applied on
    top. kv="leank" needs a mask: `mask` (a SPEC, see `leank.masks.spec`), else the file's embedded
    mask, else a training-free frequency mask at `ratio` (default 0.7).
    """
    from leank.masks.spec import resolve_mask

    args = model.args
    base = model.policy or CachePolicy(recent_tokens=default_recent(args.context_length))
    if kv is not None and kv not in KINDS:
        raise LeankError(f"--kv must be one of {', '.join(KINDS)}, got {kv!r}")
    if kv is None:
        pruned = mask is not None or ratio is not None or base.mask is not None
        kb = k_bits if k_bits is not None else base.k_bits
        vb = v_bits if v_bits is not None else base.v_bits
    else:
        pruned = kv in ("leank", "leank+kivi")
        quant = kv in ("kivi", "leank+kivi")
        if not quant and min(k_bits or 16, v_bits or 16) < 16:
            raise LeankError(f"--k-bits/--v-bits below 16 quantize the cache: use --kv kivi or leank+kivi, not --kv {kv}")
        if not pruned and (mask is not None or ratio is not None):
            raise LeankError(f"--mask/--ratio prune K channels: use --kv leank or leank+kivi, not --kv {kv}")
        default_bits = DEFAULT_KIVI_BITS if quant else 16
        kb = k_bits if k_bits is not None else (base.k_bits if quant and base.k_bits < 16 else default_bits)
        vb = v_bits if v_bits is not None else (base.v_bits if quant and base.v_bits < 16 else default_bits)
    chosen_mask = None
    if pruned:
        if mask is not None:
            chosen_mask = resolve_mask(mask, model)
        elif ratio is not None:
            from leank.masks.shipped import shipped_mask

            learned = shipped_mask(model, ratio)  # a learned mask at exactly this ratio beats a generated one
            if learned is not None and abs((learned.provenance.ratio or -1) - ratio) < 1e-6:
                chosen_mask = learned
            else:
                chosen_mask = resolve_mask(f"freq:{ratio}", model)
        elif base.mask is not None:
            chosen_mask = base.mask
        else:
            from leank.masks.shipped import shipped_mask

            chosen_mask = shipped_mask(model) or resolve_mask(f"freq:{DEFAULT_RATIO}", model)
    policy = CachePolicy(
        mask=chosen_mask,
        k_bits=kb,
        v_bits=vb,
        group_size=group_size if group_size is not None else base.group_size,
        sink_tokens=sink_tokens if sink_tokens is not None else base.sink_tokens,
        recent_tokens=recent_tokens if recent_tokens is not None else base.recent_tokens,
        block_tokens=block_tokens if block_tokens is not None else base.block_tokens,
    )
    return policy.validate(args.n_layers, args.n_kv_heads, args.head_dim, args.context_length)
