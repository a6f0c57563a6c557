"""`leank info`: what a model is and what its KV cache costs."""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.options import (DebugOpt, GroupOpt, JsonOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg, ModelOpt, RatioOpt,
                               RecentOpt, SinkOpt, ThreadsOpt, VBitsOpt, model_path)
from leank.cli.output import print_json, print_summary
from leank.convert.inspect import model_summary


def info(
    model: ModelArg = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx-size", "--ctx", "-c", min=1, metavar="N", show_default=False,
                                               help="Context length to size the cache for (default: the model's).")] = None,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Architecture, sizes, and the KV cache's bytes per token, dense and under a cache policy.

    Example: leank info --ctx-size 8192 --kv leank+kivi --k-bits 2 --v-bits 2
    """
    summary = model_summary(model_path(model, model_option), ctx=ctx, kv=kv, mask=mask, ratio=ratio, k_bits=k_bits,
                            v_bits=v_bits, group_size=group_size, sink_tokens=sink, recent_tokens=recent)
    if json_out:
        print_json(summary)
        return
    print_summary(summary)
