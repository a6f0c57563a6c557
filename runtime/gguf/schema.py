"""The `leank.*` GGUF metadata: the one place that knows its keys, for reading and writing.

Documented in docs/FORMAT.md. Stock llama.cpp ignores unknown metadata keys, so a converted file still
loads there; leank never adds tensors (llama.cpp refuses unexpected ones).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

from leank.errors import LeankError
from leank.runtime.cache.mask import Mask, Provenance
from leank.runtime.cache.policy import CachePolicy

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
K_ROTATE = "leank.cache.rotate"  # uint32 1: Hadamard-rotated K/V (optional: files before it have none)

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
    def layer(name: str) -> int:
        part = name.split(".")[1]
        return int(part) if part.isascii() and part.isdigit() else -1  # "²".isdigit() is True, int("²") fails

    prefix, _, suffix = TENSOR_NAMES[MODEL_TENSOR.ATTN_K].partition("{bid}")  # "blk.", ".attn_k"
    names = sorted((n for n in f.tensors if n.startswith(prefix) and suffix + "." in n), key=lambda n: (layer(n), n))
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
    version = f.get(K_VERSION, max_items=0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LeankError(f"{where} has no valid {K_VERSION}")
    if version > SCHEMA_VERSION:
        raise LeankError(f"{where} is schema version {version}; this leank reads up to {SCHEMA_VERSION}: upgrade leank")
    settings = {}
    for key, name in _POLICY_KEYS.items():
        value = f.get(key, max_items=0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS_SETTING:
            raise LeankError(f"{where}: {key} = {_short(value)} is not a valid setting")
        settings[name] = value
    rotate = f.get(K_ROTATE, max_items=0) if K_ROTATE in f.fields else 0
    if rotate not in (0, 1) or isinstance(rotate, bool):
        raise LeankError(f"{where}: {K_ROTATE} = {_short(rotate)} is not 0 or 1")
    settings["rotate"] = bool(rotate)
    mask = None
    if K_MASK_SHAPE in f.fields:
        mask = _read_mask(f, where, (args.n_layers, args.n_kv_heads, args.head_dim))
    fingerprint = f.get(K_FINGERPRINT, max_items=0)
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

def _read_mask(f, where: str, model_shape: tuple[int, int, int]) -> Mask:
    shape = f.get(K_MASK_SHAPE, max_items=3)
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1 << 16 for s in shape)):
        raise LeankError(f"{where}: {K_MASK_SHAPE} = {_short(shape)} is not 3 positive sizes")
    # the model's shape is checked before the bits are unpacked: nothing larger than the model is built
    if tuple(shape) != model_shape:
        raise LeankError(f"{where}: mask shape {tuple(shape)} (layers, kv_heads, head_dim) does not fit this "
                         f"file's model {model_shape}")
    if f.get(K_MASK_ORDER, "gguf", max_items=0) != "gguf":
        raise LeankError(f"{where}: unknown channel order {_short(f.get(K_MASK_ORDER, max_items=0))}")
    n = shape[0] * shape[1] * shape[2]
    packed = f.array(K_MASK_BITS)
    if packed is None:
        raise LeankError(f"{where}: {K_MASK_BITS} is missing or not a numeric array")
    if packed.size != (n + 7) // 8:
        raise LeankError(f"{where}: {K_MASK_BITS} holds {packed.size} bytes, expected {(n + 7) // 8}")
    if packed.dtype != np.uint8 and (not np.isfinite(packed).all() or packed.min(initial=0) < 0
                                      or packed.max(initial=0) > 255 or (packed != np.round(packed)).any()):
        raise LeankError(f"{where}: {K_MASK_BITS} holds values that are not bytes")
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[:n]
    kept = torch.from_numpy(bits.astype(bool)).reshape(shape)
    prov = Provenance(
        method=_text(f, K_MASK_METHOD, "unknown", where),
        ratio=_float32_ratio(_number(f, K_MASK_RATIO, where, 0.0, 1.0)),
        align=_count(f, K_MASK_ALIGN, where),
        source=_text(f, K_MASK_SOURCE, "", where),
        steps=_count(f, K_MASK_STEPS, where),
        extra=_read_extra(f.get(K_MASK_EXTRA, max_items=0), where),
    )
    return Mask(kept, prov)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(f, key: str, default: str, where: str) -> str:
    value = f.get(key, default, max_items=0)
    if not isinstance(value, str) or len(value) > MAX_EXTRA_CHARS:
        raise LeankError(f"{where}: {key} is not a string of at most {MAX_EXTRA_CHARS} characters")
    return value


def _number(f, key: str, where: str, low: float, high: float) -> float | None:
    value = f.get(key, max_items=0)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and low <= value <= high):
        raise LeankError(f"{where}: {key} = {_short(value)} is not a number within [{low}, {high}]")
    return float(value)


def _count(f, key: str, where: str) -> int | None:
    value = _number(f, key, where, 0, 1 << 40)
    if value is not None and value != int(value):
        raise LeankError(f"{where}: {key} = {value} is not a whole number")
    return None if value is None else int(value)

def _read_extra(text, where: str) -> dict:
    if text is None:
        return {}
    if not isinstance(text, str) or len(text) > MAX_EXTRA_CHARS:
        raise LeankError(f"{where}: {K_MASK_EXTRA} is not a JSON string of at most {MAX_EXTRA_CHARS} characters")
    try:
        extra = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested JSON exhausts the parser's recursion
        extra = None
    if not isinstance(extra, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
                                              for k, v in extra.items()):
        raise LeankError(f"{where}: {K_MASK_EXTRA} is not a JSON object of plain values")
    return extra

def _float32_ratio(value: float | None) -> float | None:
    # stored as float32: 0.7 reads back as 0.699999988; six decimals give back what was written
    return None if value is None else round(value, 6)

def write_leank_metadata(writer, policy: CachePolicy, fingerprint: str) -> None:
    """Add the `leank.*` keys for `policy` to a `gguf.GGUFWriter` (before its header is written)."""
    V = gguf.GGUFValueType
    writer.add_uint32(K_VERSION, SCHEMA_VERSION)
    writer.add_string(K_FINGERPRINT, fingerprint)
    for key, name in _POLICY_KEYS.items():
        writer.add_uint32(key, int(getattr(policy, name)))
    if policy.rotate:
        writer.add_uint32(K_ROTATE, 1)
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


def policy_from_file(f, args) -> CachePolicy | None:
    """The policy embedded in a converted GGUF's `leank.*` metadata, or None for a plain file."""
    meta = read_leank_metadata(f, args)
    return None if meta is None else meta.policy
