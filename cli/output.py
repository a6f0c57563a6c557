"""What the commands print and write: the two consoles, the renderers several commands share (JSON, byte
counts, the model summary, mask statistics, generation stats) and the inputs an output file must not be."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

from rich.console import Console
from rich.table import Table

from leank.runtime.outputs import check_output

err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def versus_fp16(ratio: float) -> str:
    """How a cache compares with an fp16 dense cache of the same tokens, in words."""
    if ratio != ratio:  # nan: empty cache
        return "empty"
    if ratio >= 1:
        return f"{ratio:.2f}x smaller than fp16"
    return f"{1 / ratio:.2f}x larger than fp16 (its full-precision tokens are float32)"


def cache_summary(policy, c: dict) -> str:
    """One line on a cache's memory: `c` is `CacheBytes.as_dict()`."""
    return (f"KV cache ({policy.describe()}): {human_bytes(c['total'])} for {c['tokens']} tokens, "
            f"{c['bytes_per_token']:.0f} B/token, {versus_fp16(c['ratio_vs_fp16'])} "
            f"(full {human_bytes(c['full'])}, middle K {human_bytes(c['middle_k'])}, "
            f"middle V {human_bytes(c['middle_v'])}, scales {human_bytes(c['scales'])})")


def memory_sum(row, context: int, parallel: int = 1) -> str:
    """A memory planner row (`leank.runtime.memory.MemoryRow`) as a sum: weights + caches + working set."""
    caches = (f"KV cache {human_bytes(row.cache)} at {context} tokens" if parallel == 1 else
              f"{parallel} x KV cache {human_bytes(row.cache // parallel)} at {context} tokens")
    return (f"weights {human_bytes(row.weights)} + {caches} + working set {human_bytes(row.working_set)} "
            f"= {human_bytes(row.total)}")


def print_generation_stats(s, policy) -> None:
    """Speed and memory after a generation (`generate --stats`)."""
    err.print(
        f"[dim]prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_second:.1f} tok/s | "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_second:.1f} tok/s | finish: {s.finish_reason}[/]"
    )
    err.print(f"[dim]{cache_summary(policy, s.cache)}[/]")


def print_summary(s: dict) -> None:
    """The model summary of `leank info` and `leank inspect`."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for key, label in (("file", "file"), ("architecture", "architecture"), ("name", "name"),
                       ("parameters", "parameters"), ("layers", "layers"), ("width", "width"),
                       ("heads", "heads (query / KV)"), ("head_dim", "head size"), ("ffn_dim", "feed-forward"),
                       ("vocab_size", "vocabulary"), ("context_length", "context"), ("rope", "RoPE"),
                       ("tensor_types", "tensor types"), ("file_bytes", "file size"), ("weights_path", "matrices"),
                       ("attention_path", "attention")):
        value = s.get(key)
        if key == "file_bytes":
            value = human_bytes(value)
        if key == "tensor_types":
            value = ", ".join(f"{k} x{v}" for k, v in value.items())
        t.add_row(label, str(value))
    out.print(t)
    c = s["kv_cache"]
    out.print()
    out.print(f"[bold]KV cache[/] at {c['context']} tokens, {c['policy']}:")
    out.print(f"  fp16 dense: {c['fp16_bytes_per_token']:.0f} B/token, {human_bytes(c['fp16_bytes'])}")
    out.print(f"  this policy: {c['bytes_per_token']:.1f} B/token, {human_bytes(c['bytes'])} ({versus_fp16(c['ratio_vs_fp16'])})")
    if c.get("middle_bytes_per_token") is not None:
        out.print(f"  middle region: {c['middle_bytes_per_token']:.1f} B/token "
                  f"({versus_fp16(c['middle_ratio_vs_fp16'])})")
    if s.get("leank"):
        lk = s["leank"]
        out.print()
        out.print(f"[bold]leank metadata[/]: schema {lk['version']}, {lk['fingerprint'][:23]}...")


def print_memory_plan(plan: dict) -> None:
    """The memory planner's table of `leank info --memory` (`leank.convert.inspect.memory_plan`)."""
    out.print()
    out.print(f"[bold]Memory plan[/] for {human_bytes(plan['budget_bytes'])} at {plan['context']} tokens "
              f"({plan['device']}, {plan['dtype']}; one conversation, a prompt up to the whole context):")
    t = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for name in ("policy", "weights", "KV cache", "working set", "total", "fits"):
        t.add_column(name, justify="left" if name in ("policy", "fits") else "right")
    for r in plan["rows"]:
        margin = r["margin_bytes"]
        fits = f"yes, {human_bytes(margin)} under" if r["fits"] else f"[red]no, {human_bytes(-margin)} over[/]"
        t.add_row(r["name"], human_bytes(r["weights_bytes"]), human_bytes(r["kv_cache_bytes"]),
                  human_bytes(r["working_set_bytes"]), human_bytes(r["total_bytes"]), fits)
    out.print(t)
    for r in plan["rows"]:
        if r["policy"] != r["name"]:
            out.print(f"  [dim]{r['name']}: {r['policy']}[/]")
    if plan["context"] > plan["model_context"]:
        out.print(f"[yellow]the model's context is {plan['model_context']} tokens: chat and serve stop there[/]")
    chosen, planner = plan["chosen"], plan["planner_choice"]
    if chosen:
        out.print(f"chat/serve --memory would use: {chosen}")
    elif plan["given"] and planner:
        out.print(f"[red]{plan['given']} does not fit[/]: chat/serve would refuse it; without the cache options "
                  f"--memory would use {planner}")
    else:
        out.print("[red]nothing fits[/]: a shorter --ctx, a smaller model or more memory")


def mask_report(mask, source: str) -> dict:
    """What `mask show --json` prints: the statistics plus per-head counts and channel order."""
    counts = mask.kept_counts()
    order = "hf" if mask.provenance.extra.get("channel_order") == "hf" else "gguf"
    return {"source": source, "channel_order": order, **mask.stats(),
            "kept_counts": counts.tolist(),
            "fully_pruned": [[int(l), int(h)] for l, h in (counts == 0).nonzero().tolist()]}


def print_mask_stats(stats: dict, title: str | None = None, per_layer: list | None = None) -> None:
    """The rich rendering of `Mask.stats()` (used by `mask show`, `mask make` and `inspect`)."""
    L, H, D = stats["shape"]
    heads = stats["heads"]
    if title:
        out.print(f"[bold]{title}[/]")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("shape", f"{L} layers x {H} KV heads x {D} channels")
    t.add_row("kept", f"{100 * stats['kept_fraction']:.2f} % of K channels ({100 * stats['pruned_fraction']:.2f} % pruned)")
    t.add_row("fully pruned heads", f"{stats['fully_pruned_heads']} of {heads} ({100 * stats['fully_pruned_heads'] / heads:.1f} %): "
              "no middle K and no middle V")
    t.add_row("estimated saving", f"middle-region K {100 * stats['k_saving']:.1f} %, V {100 * stats['v_saving']:.1f} % "
              "(before quantization)")
    prov = stats.get("provenance") or {}
    t.add_row("provenance", ", ".join(f"{k} {v}" for k, v in prov.items()) or "unknown")
    out.print(t)
    h = Table(title=None, box=None, pad_edge=False, show_header=True, header_style="bold")
    h.add_column("kept channels", justify="right")
    h.add_column("heads", justify="right")
    h.add_column("")
    by_count = stats["heads_by_kept_count"]
    top = max(by_count.values()) if by_count else 1
    for count, n in by_count.items():
        h.add_row(f"{count}/{D}", str(n), "[cyan]" + "█" * max(1, round(30 * n / top)) + "[/]")
    out.print(h)
    if per_layer is not None:
        out.print("[bold]kept channels per layer[/] (one number per KV head)")
        width = len(str(D))
        for layer, row in enumerate(per_layer):
            cells = " ".join(f"[dim]{c:>{width}}[/]" if c == 0 else f"{c:>{width}}" for c in row)
            out.print(f"  {layer:>3}  {cells}")


# --- output files -----------------------------------------------------------------------------------------
def files_named_in(*specs: Optional[str]) -> list[Path]:
    """The existing files a command's SPEC strings name (`leank:mask.safetensors+kivi2`, `calib.tsv:0.7`,
    a plain path): inputs that an output must never replace."""
    found = []
    for spec in specs:
        if not spec:
            continue
        for piece in [spec, *re.split(r"[+,]", spec)]:
            for candidate in (piece, piece.partition(":")[2], piece.rpartition(":")[0]):
                if candidate and Path(candidate).is_file():
                    found.append(Path(candidate))
    return found


def prepare_output(path: Optional[Path], option: str, *, force: bool, inputs: Iterable = ()) -> Optional[Path]:
    """Check an output path before any work (`leank.runtime.outputs.check_output`); None passes through."""
    if path is None:
        return None
    check_output(path, force=force, inputs=list(inputs), what=option)
    return path
