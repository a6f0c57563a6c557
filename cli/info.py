"""`leank info`: what a model is and what its KV cache costs."""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.app import app
from leank.cli.common import (GroupOpt, JsonOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg, RatioOpt, RecentOpt, SinkOpt,
                              VBitsOpt, human_bytes, out, print_json, versus_fp16)


@app.command()
def info(
    model: ModelArg = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", "-c", min=1, help="Context length to size the cache for "
                                               "(default: the model's).", show_default=False)] = None,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
):
    """Architecture, sizes, and the KV cache's bytes per token, dense and under a cache policy.

    Example: leank info --ctx 8192 --kv leank+kivi --k-bits 2 --v-bits 2
    """
    from leank.convert.inspect import model_summary

    summary = model_summary(model, ctx=ctx, kv=kv, mask=mask, ratio=ratio, k_bits=k_bits, v_bits=v_bits,
                            group_size=group_size, sink_tokens=sink, recent_tokens=recent)
    if json_out:
        print_json(summary)
        return
    print_summary(summary)


def print_summary(s: dict) -> None:
    from rich.table import Table

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
