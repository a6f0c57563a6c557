"""Summaries of a GGUF model and its cache costs, read from the header alone (no weights loaded)."""
from __future__ import annotations

from collections import Counter

import torch

from leank.kernels.dispatch import active_path
from leank.masks.choose import build_policy
from leank.runtime.cache.base import kv_dtype
from leank.runtime.cache.plan import kv_summary
from leank.runtime.engine import ModelHeader, open_header, resolve_device, resolve_dtype
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.gguf.schema import read_leank_metadata
from leank.runtime.model.linear import weights_path


def count_parameters(f: GGUFFile) -> int:
    return sum(t.n_elements for t in f.tensors.values())


def model_summary(path, ctx: int | None = None, **policy_options) -> dict:
    """Everything `leank info` shows; `path` may be an already opened `ModelHeader`."""
    h = path if isinstance(path, ModelHeader) else open_header(path)
    a, f = h.args, h.file
    policy = build_policy(h, **policy_options)
    ctx = ctx or a.context_length
    device = resolve_device("auto")
    types = Counter(f.tensor_type_name(n) for n in f.tensors)
    rope = f"{a.rope_mode}, base {a.rope_base:g}"
    if a.rope_scaling.kind != "none":
        rope += f", {a.rope_scaling.kind} x{a.rope_scaling.factor:g}"
    if a.has_rope_freqs:
        rope += ", rope_freqs"
    summary = {
        "file": str(h.path),
        "file_bytes": h.path.stat().st_size,
        "architecture": a.arch,
        "name": f.get("general.name", ""),
        "parameters": count_parameters(f),
        "layers": a.n_layers,
        "width": a.dim,
        "heads": f"{a.n_heads} / {a.n_kv_heads}",
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "ffn_dim": a.ffn_dim,
        "vocab_size": a.vocab_size,
        "context_length": a.context_length,
        "rope": rope,
        "tied_embeddings": a.tied_embeddings,
        "tensor_types": dict(types.most_common()),
        "attention_path": active_path(device),
        "weights_path": weights_path(dict(types), device),
        # the full region as the cache stores it (`kv_dtype`: float16 on CPU and CUDA)
        "kv_cache": kv_summary(policy, a, ctx, torch.finfo(kv_dtype(device, resolve_dtype(None, device))).bits // 8),
        "policy": policy.as_dict(),
    }
    meta = read_leank_metadata(f, a)
    if meta is not None:
        summary["leank"] = {"version": meta.version, "fingerprint": meta.fingerprint,
                            "policy": meta.policy.as_dict()}
    return summary
