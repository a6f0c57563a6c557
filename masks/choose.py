"""From what a user asks for to a `CachePolicy`: the one place that turns command-line options
(`--kv`, `--mask`, `--ratio`, `--k-bits`, ...), `leank eval` policy SPEC strings and `leank convert`'s
options into a policy, with one default-mask fallback chain (`choose_mask`).

The chain, when no mask is named: a learned mask shipped for this model at exactly `ratio` (when a
ratio is asked for), else a frequency mask at that ratio; without a ratio, the mask the file embeds,
else the shipped learned mask, else (where a generated mask is acceptable) `freq:0.7`.
"""
from __future__ import annotations

import re
from typing import Sequence

from leank.errors import LeankError, SpecError
from leank.kernels.quant import PACKABLE_BITS
from leank.masks.shipped import shipped_mask
from leank.masks.spec import resolve_mask
from leank.runtime import defaults
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.policy import KINDS, CachePolicy

NO_MASK = "none"  # --mask none (convert): quantization settings only, every K channel kept


def choose_mask(model, spec: str | Mask | None = None, ratio: float | None = None, align: int | None = None, *,
                generated_fallback: bool = True, progress=None) -> tuple[Mask | None, str]:
    """The mask for `model` and where it came from: "given" (a `Mask`), "spec", "none", "shipped",
    "embedded" or "generated" (a frequency mask); (None, "missing") when nothing fits and
    `generated_fallback` is off (`leank convert` then asks the user to choose)."""
    a = model.args
    if isinstance(spec, Mask):
        spec.check_fits(a.n_layers, a.n_kv_heads, a.head_dim, model.path.name)
        return spec, "given"
    if spec == NO_MASK:
        return None, "none"
    if spec is not None:
        return resolve_mask(spec, model, align, progress=progress), "spec"
    if ratio is not None:
        learned = shipped_mask(model, ratio)  # a learned mask at exactly this ratio beats a generated one
        if learned is not None and abs((learned.provenance.ratio or -1) - ratio) < 1e-6:
            return learned, "shipped"
        return resolve_mask(f"freq:{ratio}", model, align), "generated"
    if model.policy is not None and model.policy.mask is not None:
        return model.policy.mask, "embedded"
    learned = shipped_mask(model)
    if learned is not None:
        return learned, "shipped"
    if not generated_fallback:
        return None, "missing"
    return resolve_mask(f"freq:{defaults.RATIO}", model, align), "generated"


def build_policy(model, kv: str | None = None, mask: str | Mask | None = None, ratio: float | None = None,
                 k_bits: int | None = None, v_bits: int | None = None, group_size: int | None = None,
                 sink_tokens: int | None = None, recent_tokens: int | None = None,
                 block_tokens: int | None = None, rotate: bool | None = None) -> CachePolicy:
    """The policy for `model` (a `leank.Model` or a header) from user choices; unset choices fall back
    to the file, then the defaults.

    kv=None keeps what the file embeds (dense for a plain file), with any explicit setting applied on
    top. kv="leank" needs a mask: `mask` (a SPEC, see `leank.masks.spec`, a `Mask`, or "none" for every
    channel kept), else `choose_mask`'s chain.
    """
    args = model.args
    base = model.policy or CachePolicy(recent_tokens=defaults.default_recent(args.context_length))
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
        default_bits = defaults.KIVI_BITS if quant else 16
        kb = k_bits if k_bits is not None else (base.k_bits if quant and base.k_bits < 16 else default_bits)
        vb = v_bits if v_bits is not None else (base.v_bits if quant and base.v_bits < 16 else default_bits)
    chosen_mask = choose_mask(model, mask, ratio)[0] if pruned else None
    policy = CachePolicy(
        mask=chosen_mask,
        k_bits=kb,
        v_bits=vb,
        group_size=group_size if group_size is not None else base.group_size,
        sink_tokens=sink_tokens if sink_tokens is not None else base.sink_tokens,
        recent_tokens=recent_tokens if recent_tokens is not None else base.recent_tokens,
        block_tokens=block_tokens if block_tokens is not None else base.block_tokens,
        rotate=rotate if rotate is not None else base.rotate,
    )
    return policy.validate(args.n_layers, args.n_kv_heads, args.head_dim, args.context_length)


# --- the memory planner's candidates --------------------------------------------------------------------
# (name, build_policy choices), least compressed first: `leank info/chat/serve --memory` weigh them in
# this order and keep the first that fits. A new preset is one line here, in its place by size.
PLANNER_PRESETS = [
    ("dense", dict(kv="dense")),  # an fp16 (on CPU) or compute-dtype cache of every token
    ("kivi4", dict(kv="kivi", k_bits=4, v_bits=4)),  # KIVI-4: nearly lossless
    ("leank+kivi", dict(kv="leank+kivi")),  # the default compressed cache: pruned K, KIVI-2
]


def planner_policies(model, **settings) -> list[tuple[str, CachePolicy]]:
    """The memory planner's candidates for `model`, least compressed first: [(name, policy), ...] from
    `PLANNER_PRESETS`. `settings` (sink_tokens, recent_tokens, group_size, block_tokens) apply to every
    compressed one, as the CLI's --sink/--recent/--group-size do; a preset that comes out the same as
    an earlier one (today's smallest preset is the default leank+kivi) is listed once."""
    out: list[tuple[str, CachePolicy]] = []
    for name, choices in PLANNER_PRESETS:
        policy = build_policy(model, **choices, **settings)
        if all(p.describe() != policy.describe() for _, p in out):
            out.append((name, policy))
    return out


# --- policy SPEC strings (`leank eval -p`) --------------------------------------------------------------
_KIVI = re.compile(r"kivi(\d+)(?:/(\d+))?")
_OPTIONS = {"sink": "sink_tokens", "recent": "recent_tokens", "group": "group_size", "block": "block_tokens",
            "rotate": "rotate"}


def parse_policy(spec: str, model, *, sink_tokens: int | None = None, recent_tokens: int | None = None,
                 group_size: int | None = None, block_tokens: int | None = None) -> CachePolicy:
    """The cache policy a SPEC names, for `model` (built by `build_policy`, like the CLI options).

    SPEC := BASE ("," OPTION)*
      BASE   := "dense" | KIVI | "leank:" MASK ["+" KIVI]
      KIVI   := "kivi" BITS | "kivi" K_BITS "/" V_BITS      (bits 2, 4, 8; e.g. kivi4, kivi2, kivi4/2)
      MASK   := a mask SPEC of `leank.masks.spec.resolve_mask`: freq:0.5, ones, a mask file, ...
      OPTION := sink=N | recent=N | group=N | block=N | rotate=0|1   (this policy only; rotate=1: Hadamard
                rotation of K and V before quantizing, see `leank.runtime.cache.policy`)

    Examples: `dense`, `kivi4`, `leank:freq:0.5`, `leank:freq:0.7+kivi4`, `leank:mask.safetensors+kivi2`,
    `kivi2,recent=256,group=64`. The keyword arguments are shared settings (the CLI's --sink, --recent,
    --group-size) that OPTIONs override; anything unset falls back to `build_policy`'s defaults (the
    file's embedded policy, then the paper defaults sized to the model's context).
    """
    text = spec.strip()
    base, *opts = text.split(",")
    settings = {"sink_tokens": sink_tokens, "recent_tokens": recent_tokens, "group_size": group_size,
                "block_tokens": block_tokens}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key.strip() not in _OPTIONS or not value.strip().isdigit():
            raise SpecError(f"policy {spec!r}: {opt!r} is not an option; use sink=N, recent=N, group=N, block=N "
                             "or rotate=0|1")
        if key.strip() == "rotate" and value.strip() not in ("0", "1"):
            raise SpecError(f"policy {spec!r}: rotate is 0 or 1, got {value.strip()!r}")
        settings[_OPTIONS[key.strip()]] = bool(int(value)) if key.strip() == "rotate" else int(value)

    def kivi_bits(part: str) -> tuple[int, int]:
        m = _KIVI.fullmatch(part)
        if m is None:
            raise SpecError(f"policy {spec!r}: {part!r} is not kiviN or kiviK/V (e.g. kivi4, kivi4/2)")
        k = int(m.group(1))
        v = int(m.group(2)) if m.group(2) else k
        if k not in PACKABLE_BITS or v not in PACKABLE_BITS:
            widths = ", ".join(map(str, PACKABLE_BITS[:-1])) + f" or {PACKABLE_BITS[-1]}"
            raise SpecError(f"policy {spec!r}: KIVI bits must be {widths}")
        return k, v

    if base == "dense":
        return build_policy(model, kv="dense", **settings)
    if base.startswith("kivi"):
        k, v = kivi_bits(base)
        return build_policy(model, kv="kivi", k_bits=k, v_bits=v, **settings)
    if base.startswith("leank:") and len(base) > len("leank:"):
        mask, plus, quant = base[len("leank:"):].rpartition("+")
        if not plus or not _KIVI.fullmatch(quant):  # no "+kiviN" suffix: all of it is the mask
            return build_policy(model, kv="leank", mask=base[len("leank:"):], **settings)
        k, v = kivi_bits(quant)
        return build_policy(model, kv="leank+kivi", mask=mask, k_bits=k, v_bits=v, **settings)
    raise SpecError(f"policy {spec!r}: expected dense, kiviN, leank:MASK or leank:MASK+kiviN")


def parse_policies(specs: Sequence[str], model, **shared) -> dict[str, CachePolicy]:
    """{spec: policy} for several SPECs, in order (duplicates are an error: they would share a column)."""
    out: dict[str, CachePolicy] = {}
    for spec in specs:
        if spec in out:
            raise SpecError(f"policy {spec!r} is given twice")
        try:
            out[spec] = parse_policy(spec, model, **shared)
        except LeankError as e:  # a SPEC's own grammar stays a SpecError (a usage error)
            raise type(e)(str(e) if str(e).startswith("policy ") else f"policy {spec!r}: {e}") from None
    return out
