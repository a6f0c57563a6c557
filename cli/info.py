"""`leank info`: what a model is and what its KV cache costs."""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.options import (DebugOpt, GroupOpt, JsonOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg, ModelOpt, RatioOpt,
                               RecentOpt, SinkOpt, ThreadsOpt, VBitsOpt, memory_option, model_path, parse_size)
from leank.cli.output import print_json, print_memory_plan, print_summary
from leank.convert.inspect import model_summary


def info(
    model: ModelArg = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx-size", "--ctx", "-c", min=1, metavar="N", show_default=False,
                                               help="Context length to size the cache for (default: the model's).")] = None,
    memory: Annotated[Optional[str], memory_option(
        "Plan for this much memory (e.g. 8GiB, 512MiB, 2G): a table of the weights, the KV cache at --ctx and the "
        "working set under each cache leank can choose, least compressed first, and whether it fits; chat and "
        "serve --memory use the first that fits.")] = None,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Architecture, sizes, and the KV cache's bytes per token, dense and under a cache policy; with
    --memory, what fits in a memory budget.

    The cache policy options (--kv, --mask, --k-bits, ...) size the cache the summary shows; without
    them it is the file's own (dense for a plain GGUF file).

    --memory SIZE adds the memory planner: for each cache policy it can choose (dense; kivi4: K and V
    in 4 bits; leank+kivi: pruned K channels and 2-bit K and V, the default compressed cache), the bytes
    of the weights as this machine holds them, the KV cache at --ctx tokens (default: the model's
    context), and the working set of a prompt of that length, against the budget. leank chat --memory
    and leank serve --memory pick the least compressed that fits when no --kv is given. On a CPU a
    compressed cache's working set is the larger one (a later prompt is scored against its middle
    tokens in float32, 4096 at a time), so for a small model dense can come out smallest.

    Examples: leank info --ctx 8192 --kv leank+kivi --k-bits 4 --v-bits 4; leank info --ctx 32768 --memory 8GiB;
    leank info model.gguf --memory 512MiB --json
    """
    budget = None if memory is None else parse_size(memory)
    summary = model_summary(model_path(model, model_option), ctx=ctx, memory=budget, kv=kv, mask=mask, ratio=ratio,
                            k_bits=k_bits, v_bits=v_bits, group_size=group_size, sink_tokens=sink, recent_tokens=recent)
    if json_out:
        print_json(summary)
        return
    print_summary(summary)
    if budget is not None:
        print_memory_plan(summary["memory"])
