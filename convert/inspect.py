"""Summaries of a GGUF model and its cache costs, read from the header alone (no weights loaded)."""
from __future__ import annotations

from collections import Counter

import torch

from leank.kernels.dispatch import active_path
from leank.masks.choose import build_policy, planner_policies
from leank.runtime.cache.base import kv_dtype
from leank.runtime.cache.plan import kv_summary
from leank.runtime.engine import ModelHeader, open_header, resolve_device, resolve_dtype
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.gguf.schema import read_leank_metadata
from leank.runtime.memory import first_fitting, plan_memory, planned_weights
from leank.runtime.model.linear import weights_path


def count_parameters(f: GGUFFile) -> int:
    return sum(t.n_elements for t in f.tensors.values())


def model_summary(path, ctx: int | None = None, memory: int | None = None, **policy_options) -> dict:
    """Everything `leank info` shows; `path` may be an already opened `ModelHeader`. With a `memory`
    budget (bytes), the memory planner's table too (`memory_plan`)."""
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
    if memory is not None:
        given = any(policy_options.get(k) is not None for k in ("kv", "mask", "ratio", "k_bits", "v_bits"))
        settings = {k: policy_options.get(k) for k in ("group_size", "sink_tokens", "recent_tokens")}
        summary["memory"] = memory_plan(h, ctx, memory, policy if given else None, **settings)
    return summary


def memory_plan(h: ModelHeader, ctx: int, budget: int, given=None, **settings) -> dict:
    """The memory planner's table for one conversation of `ctx` tokens on this machine's device: each
    candidate's weights (from the header: `planned_weights`), KV cache and working set (a prompt of up
    to `ctx` tokens in one pass, as `leank chat` feeds it), against `budget` bytes. `planner_choice` is
    the first candidate that fits; `chosen` what `leank chat --memory` would use with the same options:
    that one, or `given` (a policy the command line chose, listed too when no candidate is the same)
    if it fits."""
    device = resolve_device("auto")
    dtype = resolve_dtype(None, device)
    candidates = planner_policies(h, **{k: v for k, v in settings.items() if v is not None})
    planned = len(candidates)
    if given is not None and all(p.describe() != given.describe() for _, p in candidates):
        candidates.append((f"--kv {given.kind}", given))
    rows = plan_memory(candidates, h.args, planned_weights(h.file, h.args, device, dtype), device=device, dtype=dtype,
                       budget=budget, context=ctx)
    planner = first_fitting(rows[:planned])
    mine = None if given is None else next(r for r in rows if r.policy.describe() == given.describe())
    chosen = planner if mine is None else (mine if mine.fits else None)

    def name(row):
        return None if row is None else row.name

    return {"budget_bytes": budget, "context": ctx, "model_context": h.args.context_length, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "rows": [r.as_dict() for r in rows], "given": name(mine),
            "chosen": name(chosen), "planner_choice": name(planner)}
