"""A conversation's whole KV cache on disk: one safetensors file with a small JSON header, never pickle.

    save_session(path, model, cache, tokens, extra={...})   # atomic: a temporary file, then a rename
    saved = load_session(path, model, policy)               # SavedSession(cache, tokens, extra)

The file holds every layer's tensors exactly as the cache keeps them (a dense cache's K and V; a
compressed cache's full region, middle codes, scales and mins, per head group), only the stored
tokens (no spare capacity), the token ids the cache holds, the policy and the model's K fingerprint
(`leank.runtime.gguf.schema.k_fingerprint`). A restored cache gives bit-identical next-token logits.

Session files are untrusted: `load_session` checks the header, then every tensor's name, dtype and
shape against what the model and the policy imply before reading any data, and refuses anything
else (another model, another policy, a damaged, truncated or hostile file) with one `LeankError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from leank.errors import LeankError
from leank.kernels.quant import packed_width
from leank.kernels.reference import MiddleGroup
from leank.runtime.cache.base import kv_dtype
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.gguf.schema import k_fingerprint
from leank.runtime.outputs import atomic_write

FORMAT = "leank-session"
VERSION = 1
MAX_HEADER_CHARS = 1 << 22  # the JSON header (policy, lengths, the caller's extra such as chat messages)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
              torch.int64: "I64"}
_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class SavedSession:
    """What `load_session` gives back: a cache ready to extend, the token ids it holds, the caller's extra."""

    cache: object
    tokens: list[int]
    extra: dict = field(default_factory=dict)


def model_fingerprint(model) -> str:
    """The model file's K fingerprint, computed once per loaded model."""
    fp = _fingerprints.get(model)
    if fp is None:
        fp = _fingerprints[model] = k_fingerprint(model.file)
    return fp


def policy_settings(policy: CachePolicy | None) -> dict:
    """The fields that decide a cache's layout, as JSON (the mask by its sha256)."""
    if policy is None or policy.is_dense:
        return {"kind": "dense"}
    mask = None
    if policy.mask is not None:
        mask = "sha256:" + hashlib.sha256(policy.mask.kept.numpy().tobytes()).hexdigest()
    return {"kind": policy.kind, "k_bits": policy.k_bits, "v_bits": policy.v_bits, "group_size": policy.group_size,
            "sink_tokens": policy.sink_tokens, "recent_tokens": policy.recent_tokens,
            "block_tokens": policy.block_tokens, "mask": mask}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes, in name order: a damaged file is caught, not attended."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


# --- the layout both sides agree on ---------------------------------------------------------------------
def _expected(model, policy: CachePolicy | None, full: list[int], middle: list[int], n_tokens: int,
              dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor a session of these lengths holds: name -> (dtype, shape)."""
    a = model.args
    H, D = a.n_kv_heads, a.head_dim
    out = {"tokens": (torch.int64, (n_tokens,))}
    dense = policy is None or policy.is_dense
    for i in range(a.n_layers):
        if full[i]:
            out[f"layer.{i}.k" if dense else f"layer.{i}.full_k"] = (dtype, (1, H, full[i], D))
            out[f"layer.{i}.v" if dense else f"layer.{i}.full_v"] = (dtype, (1, H, full[i], D))
        if dense or not middle[i]:
            continue
        p, G = policy, policy.group_size
        counts = (policy.mask.kept[i].sum(-1) if policy.mask is not None else torch.full((H,), D)).tolist()
        for j, c in enumerate(sorted(set(c for c in counts if c))):
            nh, M, name = counts.count(c), middle[i], f"layer.{i}.group.{j}"
            if p.k_bits == 16:
                out[name + ".k"] = (dtype, (1, nh, M, c))
            else:
                out[name + ".k"] = (torch.uint8, (1, nh, M, packed_width(c, p.k_bits)))
                out[name + ".k_scale"] = out[name + ".k_min"] = (torch.float16, (1, nh, M // G, c))
            if p.v_bits == 16:
                out[name + ".v"] = (dtype, (1, nh, M, D))
            else:
                out[name + ".v"] = (torch.uint8, (1, nh, M, packed_width(D, p.v_bits)))
                out[name + ".v_scale"] = out[name + ".v_min"] = (torch.float16, (1, nh, M, D // G))
    return out


def _cache_tensors(cache) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """The stored tokens' tensors of a one-sequence cache, and its per-layer full/middle lengths."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(cache, DenseCache):
        for i, n in enumerate(cache.lengths):
            if n:
                tensors[f"layer.{i}.k"] = cache.k[i][:, :, :n]
                tensors[f"layer.{i}.v"] = cache.v[i][:, :, :n]
        return tensors, list(cache.lengths), [0] * cache.n_layers
    if not isinstance(cache, CompressedCache):
        raise LeankError(f"a {type(cache).__name__} cannot be saved as a session")
    G = cache.policy.group_size
    for i, st in enumerate(cache.layers):
        if st.full_len:
            tensors[f"layer.{i}.full_k"] = st.full_k[:, :, : st.full_len]
            tensors[f"layer.{i}.full_v"] = st.full_v[:, :, : st.full_len]
        M = st.middle_len
        if not M:
            continue
        for j, g in enumerate(st.groups):
            name = f"layer.{i}.group.{j}"
            for part, t, per in (("k", g.k, 1), ("k_scale", g.k_scale, G), ("k_min", g.k_min, G), ("v", g.v, 1),
                                 ("v_scale", g.v_scale, 1), ("v_min", g.v_min, 1)):
                if t is not None:
                    tensors[f"{name}.{part}"] = t[:, :, : M // per]
    return tensors, [st.full_len for st in cache.layers], [st.middle_len for st in cache.layers]


# --- save -----------------------------------------------------------------------------------------------
def save_session(path: str | os.PathLike, model, cache, tokens: Sequence[int], extra: dict | None = None, *,
                 force: bool = True, inputs: Sequence = (), what: str = "") -> int:
    """Write `cache` (one sequence) and the token ids it holds to `path`, atomically; returns the file's bytes.

    `extra` is any JSON object the caller wants back (a chat's messages); it goes into the header. The
    write goes through `leank.runtime.outputs.atomic_write`: never over the model file, an input, a
    directory, a device or a pipe, and over an existing file only with `force` (the default: a session
    file is rewritten after every turn)."""
    path = Path(path)
    tokens = [int(t) for t in tokens]
    if getattr(cache, "batch", 1) != 1:
        raise LeankError("only a one-sequence cache can be saved as a session")
    if cache.seq_len != len(tokens):
        raise LeankError(f"the cache holds {cache.seq_len} tokens but {len(tokens)} token ids were given")
    tensors, full, middle = _cache_tensors(cache)
    if any(f + m != len(tokens) for f, m in zip(full, middle)):
        raise LeankError("the cache is between layers (an interrupted forward pass): nothing consistent to save")
    policy = cache.policy if isinstance(cache, CompressedCache) else None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tensors["tokens"] = torch.tensor(tokens, dtype=torch.int64)
    header = {"format": FORMAT, "version": VERSION, "fingerprint": model_fingerprint(model),
              "arch": model.args.arch, "dtype": _dtype_name(cache.dtype), "policy": policy_settings(policy),
              "tokens": len(tokens), "full": full, "middle": middle, "extra": extra or {},
              "sha256": _digest(tensors)}
    text = json.dumps(header, ensure_ascii=False)
    if len(text) > MAX_HEADER_CHARS:
        raise LeankError(f"the session's header would be {len(text)} characters (at most {MAX_HEADER_CHARS})")
    with atomic_write(path, force=force, inputs=[model.path, *inputs], what=what) as tmp:
        save_file(tensors, str(tmp), metadata={"leank": text})
    return path.stat().st_size


# --- load -----------------------------------------------------------------------------------------------
def _int_list(value, n: int, what: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)):
        raise ValueError(f"{what} must be {n} non-negative integers")
    return value


def _read_header(f, model, policy: CachePolicy | None) -> dict:
    meta = f.metadata() or {}
    text = meta.get("leank")
    if not isinstance(text, str):
        raise ValueError("not a leank session file")
    if len(text) > MAX_HEADER_CHARS:
        raise ValueError(f"header of {len(text)} characters (at most {MAX_HEADER_CHARS})")
    h = json.loads(text)
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ValueError("not a leank session file")
    if h.get("version") != VERSION:
        raise ValueError(f"session format version {str(h.get('version'))[:20]!r}; this leank reads {VERSION}")
    if h.get("fingerprint") != model_fingerprint(model):
        raise LeankError("was saved with another model (K-projection fingerprint mismatch)")
    want = policy_settings(policy)
    if h.get("policy") != want:
        got = h.get("policy")
        got = got.get("kind", "?") if isinstance(got, dict) else "?"
        raise LeankError(f"was saved under another cache policy ({str(got)[:40]}); this one is {want['kind']}")
    if h.get("dtype") != _dtype_name(model.dtype):
        raise LeankError(f"was saved in {str(h.get('dtype'))[:20]}; this model computes in {_dtype_name(model.dtype)}")
    n = h.get("tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= model.args.context_length:
        raise ValueError(f"token count {str(n)[:20]} is not within the model's context of {model.args.context_length}")
    L = model.args.n_layers
    full, middle = _int_list(h.get("full"), L, "full"), _int_list(h.get("middle"), L, "middle")
    if any(a + b != n for a, b in zip(full, middle)):
        raise ValueError("per-layer lengths do not add up to the token count")
    if policy is not None and not policy.is_dense:
        S, R, blk = policy.sink_tokens, policy.recent_tokens, policy.block_tokens
        for a, b in zip(full, middle):
            # what compaction leaves: whole blocks in the middle, the sink and under a block past the window
            if b % blk or (b and a < S) or a >= S + R + blk:
                raise ValueError(f"region lengths (full {a}, middle {b}) that no cache under this policy holds")
    if not isinstance(h.get("extra", {}), dict):
        raise ValueError("extra must be a JSON object")
    return h


def load_session(path: str | os.PathLike, model, policy: CachePolicy | None = None) -> SavedSession:
    """Read a session written by `save_session` for `model` under `policy` (None or dense: a dense cache).

    Raises `LeankError` (one line naming the file) for anything but such a file."""
    path = Path(path)
    if not path.is_file():
        raise LeankError(f"{path}: {'no such session file' if not path.exists() else 'not a regular file'}")
    dense = policy is None or policy.is_dense
    try:
        with safe_open(str(path), framework="pt") as f:
            h = _read_header(f, model, policy)
            full, middle, n = h["full"], h["middle"], h["tokens"]
            expected = _expected(model, policy, full, middle, n, kv_dtype(model.device, model.dtype))
            names = set(f.keys())
            if names != set(expected):
                odd = sorted(names ^ set(expected))[:3]
                raise ValueError(f"missing or extra tensors ({', '.join(x[:60] for x in odd)})")
            for name, (dtype, shape) in expected.items():
                sl = f.get_slice(name)
                if sl.get_dtype() != _ST_DTYPES[dtype] or tuple(sl.get_shape()) != shape:
                    raise ValueError(f"tensor {name} is {sl.get_dtype()} {tuple(sl.get_shape())}, "
                                     f"expected {_ST_DTYPES[dtype]} {shape}")
        # read in one go (faster than touching a memory map tensor by tensor), then check the digest
        tensors = load_safetensors(path.read_bytes())
        if set(tensors) != set(expected) or _digest(tensors) != h.get("sha256"):
            raise LeankError("damaged session file (its contents do not match the digest in its header)")
    except LeankError as e:
        raise LeankError(f"{path}: {e}") from None
    except RecursionError:
        raise LeankError(f"{path}: damaged session header (JSON nested too deeply)") from None
    except Exception as e:  # safetensors' own parse errors, JSON errors, our ValueErrors (only ours are shown)
        detail = str(e)[:200] if type(e) is ValueError else "not a leank session, or damaged"
        raise LeankError(f"{path}: not a readable session file ({detail})") from None
    tokens = tensors.pop("tokens")
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= model.args.vocab_size):
        raise LeankError(f"{path}: token ids outside the vocabulary of {model.args.vocab_size}")
    cache = model.new_cache(policy=policy if not dense else CachePolicy())
    dev = model.device
    if dense:
        for i in range(model.args.n_layers):
            if full[i]:
                cache.k[i] = tensors[f"layer.{i}.k"].to(dev)
                cache.v[i] = tensors[f"layer.{i}.v"].to(dev)
        cache.lengths = list(full)
    else:
        for i, st in enumerate(cache.layers):
            st.full_len, st.middle_len = full[i], middle[i]
            if full[i]:
                st.full_k = tensors[f"layer.{i}.full_k"].to(dev)
                st.full_v = tensors[f"layer.{i}.full_v"].to(dev)
            if middle[i]:
                st.groups = []
                for j, (heads, channels) in enumerate(cache._group_specs[i]):
                    g = {part: tensors.get(f"layer.{i}.group.{j}.{part}")
                         for part in ("k", "v", "k_scale", "k_min", "v_scale", "v_min")}
                    g = {k: None if v is None else v.to(dev) for k, v in g.items()}
                    st.groups.append(MiddleGroup(heads, channels, **g))
    return SavedSession(cache, tokens.tolist(), dict(h.get("extra", {})))
