"""The `leank.*` GGUF metadata: the one place that knows its keys, for reading and writing.

Documented in docs/FORMAT.md. Stock llama.cpp ignores unknown metadata keys, so a converted file still
loads there; leank never adds tensors (llama.cpp refuses unexpected ones).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from leank.errors import LeankError
from leank.masks.mask import Mask, Provenance
from leank.runtime.policy import BITS, CachePolicy

SCHEMA_VERSION = 1
PREFIX = "leank."

K_VERSION = "leank.version"
K_FINGERPRINT = "leank.fingerprint"  # "sha256:<hex>" over every layer's attn_k tensor bytes
K_MASK_SHAPE = "leank.mask.shape"  # [layers, kv_heads, head_dim]
K_MASK_BITS = "leank.mask.bits"  # uint8 array, numpy packbits little bit order, row-major
K_MASK_ORDER = "leank.mask.channel_order"  # always "gguf": the file's own channel order
K_MASK_METHOD = "leank.mask.method"
K_MASK_RATIO = "leank.mask.ratio"
K_MASK_ALIGN = "leank.mask.align"
K_MASK_SOURCE = "leank.mask.source"
K_MASK_STEPS = "leank.mask.steps"
K_MASK_EXTRA = "leank.mask.extra"  # JSON object of further provenance (arch, tokens, seed...), optional
K_K_BITS = "leank.cache.k_bits"
K_V_BITS = "leank.cache.v_bits"
K_GROUP = "leank.cache.group_size"
K_SINK = "leank.cache.sink_tokens"
K_RECENT = "leank.cache.recent_tokens"
K_BLOCK = "leank.cache.block_tokens"

_POLICY_KEYS = {K_K_BITS: "k_bits", K_V_BITS: "v_bits", K_GROUP: "group_size", K_SINK: "sink_tokens",
                K_RECENT: "recent_tokens", K_BLOCK: "block_tokens"}
MAX_TOKENS_SETTING = 1 << 24
MAX_EXTRA_CHARS = 1 << 16

@dataclass(frozen=True)
class LeankMetadata:
    version: int
    policy: CachePolicy
    fingerprint: str

    @property
    def mask(self) -> Mask | None:
        return self.policy.mask

def k_fingerprint(f) -> str:
    """sha256 over the raw bytes of every `blk.N.attn_k.weight` (and bias), in layer order."""
    h = hashlib.sha256()
    names = sorted((n for n in f.tensors if n.startswith("blk.") and ".attn_k." in n),
                   key=lambda n: (int(n.split(".")[1]) if n.split(".")[1].isdigit() else -1, n))
    if not names:
        raise LeankError(f"{f.path}: no attn_k tensors to fingerprint")
    for name in names:
        t = f.tensors[name]
        h.update(name.encode())
        h.update(f.raw_bytes(t.data_offset, t.n_bytes))
    return "sha256:" + h.hexdigest()

def leank_keys(f) -> list[str]:
    return [k for k in f.keys() if k.startswith(PREFIX)]

def read_leank_metadata(f, args, check_fingerprint: bool = True) -> LeankMetadata | None:
    """Parse and validate a file's `leank.*` metadata; None when it has none."""
    keys = leank_keys(f)
    if not keys:
        return None
    where = f"{f.path}: leank metadata"
    version = f.get(K_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LeankError(f"{where} has no valid {K_VERSION}")
    if version > SCHEMA_VERSION:
        raise LeankError(f"{where} is schema version {version}; this leank reads up to {SCHEMA_VERSION}: upgrade leank")
    settings = {}
    for key, name in _POLICY_KEYS.items():
        value = f.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS_SETTING:
            raise LeankError(f"{where}: {key} = {value!r} is not a valid setting")
        settings[name] = value
    mask = None
    if f.get(K_MASK_SHAPE) is not None:
        mask = _read_mask(f, where)
        mask.check_fits(args.n_layers, args.n_kv_heads, args.head_dim, "this file's model")
    fingerprint = f.get(K_FINGERPRINT)
    if not isinstance(fingerprint, str):
        raise LeankError(f"{where} has no {K_FINGERPRINT}")
    if check_fingerprint and fingerprint != k_fingerprint(f):
        raise LeankError(f"{where} was made for a different model (K-projection fingerprint mismatch); "
                         "convert the original model again")
    try:
        policy = CachePolicy(mask=mask, **settings).validate(args.n_layers, args.n_kv_heads, args.head_dim)
    except LeankError as e:
        raise LeankError(f"{where}: {e}") from e
    return LeankMetadata(version, policy, fingerprint)

def _read_mask(f, where: str) -> Mask:
    shape = f.get(K_MASK_SHAPE)
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and 0 < s <= 1 << 16 for s in shape)):
        raise LeankError(f"{where}: {K_MASK_SHAPE} = {shape!r} is not 3 positive sizes")
    if f.get(K_MASK_ORDER, "gguf") != "gguf":
        raise LeankError(f"{where}: unknown channel order {f.get(K_MASK_ORDER)!r}")
    n = shape[0] * shape[1] * shape[2]
    packed = f.array(K_MASK_BITS)
    if packed is None:
        raise LeankError(f"{where}: {K_MASK_BITS} is missing or not a numeric array")
    packed = packed.astype(np.int64)
    if packed.size != (n + 7) // 8 or packed.min(initial=0) < 0 or packed.max(initial=0) > 255:
        raise LeankError(f"{where}: {K_MASK_BITS} holds {packed.size} bytes, expected {(n + 7) // 8}")
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[:n]
    kept = torch.from_numpy(bits.astype(bool)).reshape(shape)
    prov = Provenance(
        method=str(f.get(K_MASK_METHOD, "unknown")),
        ratio=_float32_ratio(f.get(K_MASK_RATIO)),
        align=_opt(f.get(K_MASK_ALIGN), int),
        source=str(f.get(K_MASK_SOURCE, "")),
        steps=_opt(f.get(K_MASK_STEPS), int),
        extra=_read_extra(f.get(K_MASK_EXTRA), where),
    )
    return Mask(kept, prov)

def _read_extra(text, where: str) -> dict:
    if text is None:
        return {}
    if not isinstance(text, str) or len(text) > MAX_EXTRA_CHARS:
        raise LeankError(f"{where}: {K_MASK_EXTRA} is not a JSON string of at most {MAX_EXTRA_CHARS} characters")
    try:
        extra = json.loads(text)
    except ValueError:
        extra = None
    if not isinstance(extra, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
                                              for k, v in extra.items()):
        raise LeankError(f"{where}: {K_MASK_EXTRA} is not a JSON object of plain values")
    return extra

def _float32_ratio(value) -> float | None:
    # stored as float32: 0.7 reads back as 0.699999988; six decimals give back what was written
    value = _opt(value, float)
    return None if value is None else round(value, 6)

def _opt(value, kind):
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

def write_leank_metadata(writer, policy: CachePolicy, fingerprint: str) -> None:
    """Add the `leank.*` keys for `policy` to a `gguf.GGUFWriter` (before its header is written)."""
    import gguf

    V = gguf.GGUFValueType
    writer.add_uint32(K_VERSION, SCHEMA_VERSION)
    writer.add_string(K_FINGERPRINT, fingerprint)
    for key, name in _POLICY_KEYS.items():
        writer.add_uint32(key, int(getattr(policy, name)))
    mask = policy.mask
    if mask is not None:
        bits = np.packbits(mask.kept.numpy().reshape(-1).astype(np.uint8), bitorder="little")
        writer.add_array(K_MASK_SHAPE, [int(s) for s in mask.shape])
        writer.add_key_value(K_MASK_BITS, bits.tolist(), V.ARRAY, V.UINT8)
        writer.add_string(K_MASK_ORDER, "gguf")
        p = mask.provenance
        writer.add_string(K_MASK_METHOD, p.method)
        if p.ratio is not None:
            writer.add_float32(K_MASK_RATIO, float(p.ratio))
        if p.align is not None:
            writer.add_uint32(K_MASK_ALIGN, int(p.align))
        if p.source:
            writer.add_string(K_MASK_SOURCE, p.source)
        if p.steps is not None:
            writer.add_uint32(K_MASK_STEPS, int(p.steps))
        if p.extra:
            plain = {str(k): v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for k, v in p.extra.items()}
            writer.add_string(K_MASK_EXTRA, json.dumps(plain, sort_keys=True))

