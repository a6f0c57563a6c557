"""Summaries of a GGUF model and its cache costs, read from the header alone (no weights loaded)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from leank.runtime.config import ModelArgs, read_model_args
from leank.runtime.gguf_file import GGUFFile


@dataclass
class ModelHeader:
    """What `build_policy` and the summaries need of a model, without its weights."""

    path: Path
    file: GGUFFile
    args: ModelArgs
    policy: object = None


def open_header(path) -> ModelHeader:
    from leank.runtime.policy import policy_from_file
    from leank.runtime.tokenizer import default_model_path

    path = default_model_path() if path is None else Path(path)
    f = GGUFFile(path)
    args = read_model_args(f)
    return ModelHeader(path, f, args, policy_from_file(f, args))


def count_parameters(f: GGUFFile) -> int:
    return sum(t.n_elements for t in f.tensors.values())


def kv_summary(policy, args, ctx: int, full_bytes_per_element: int = 2) -> dict:
    """Bytes per token for `policy` at `ctx` tokens, against an fp16 dense cache."""
    from leank.runtime.compressed import planned_nbytes, region_sizes

    fp16_per_token = args.kv_bytes_per_token(2)
    if policy.is_dense:
        total = args.kv_bytes_per_token(full_bytes_per_element) * ctx
        middle_ratio = None
        middle_per_token = None
    else:
        b = planned_nbytes(policy, args, ctx, full_bytes_per_element=full_bytes_per_element)
        total = b.total
        _, middle = region_sizes(policy, ctx)
        mid_bytes = b.middle_k + b.middle_v + b.scales
        middle_per_token = mid_bytes / middle if middle else None
        middle_ratio = fp16_per_token / middle_per_token if middle_per_token else None
    return {
        "context": ctx,
        "policy": policy.describe(),
        "fp16_bytes_per_token": fp16_per_token,
        "fp16_bytes": fp16_per_token * ctx,
        "bytes": total,
        "bytes_per_token": total / ctx,
        "ratio_vs_fp16": fp16_per_token * ctx / total if total else float("nan"),
        "middle_bytes_per_token": middle_per_token,
        "middle_ratio_vs_fp16": middle_ratio,
        "full_region_bytes_per_element": full_bytes_per_element,
    }


def model_summary(path, ctx: int | None = None, **policy_options) -> dict:
    """Everything `leank info` shows; `path` may be an already opened `ModelHeader`."""
    from leank.convert.schema import read_leank_metadata
    from leank.kernels.dispatch import active_path
    from leank.runtime.linear import weights_path
    from leank.runtime.cache import kv_dtype
    from leank.runtime.engine import resolve_device, resolve_dtype
    from leank.runtime.policy import build_policy

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
