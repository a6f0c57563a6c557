"""`leank perplexity`: how well MODEL predicts a text file, llama.cpp's way."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from typing_extensions import Annotated

from leank.cli.options import (DebugOpt, DeviceOpt, DtypeOpt, GroupOpt, JsonOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg,
                               ModelOpt, RatioOpt, RecentOpt, SinkOpt, ThreadsOpt, VBitsOpt, load_model, model_path,
                               policy_from_options, read_text_file, usage_error)
from leank.cli.output import err, out, print_json
from leank.errors import LeankError
from leank.masks.evaluate import kl_divergence


def perplexity(
    model: ModelArg = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", metavar="FILE", show_default=False,
                                                 help="UTF-8 text file to score.")] = None,
    ctx: Annotated[int, typer.Option("--ctx-size", "--ctx", "-c", min=2, metavar="N",
                                     help="Score the first N tokens of the file.")] = 512,
    decode: Annotated[bool, typer.Option("--decode", help="Feed tokens one at a time through the decode path after a "
                                         "short prefill, so that a compressed cache is exercised.")] = False,
    prefix: Annotated[int, typer.Option("--prefix", min=1, metavar="N",
                                        help="Tokens prefilled before --decode starts.")] = 64,
    kld: Annotated[bool, typer.Option("--kld", help="Decode the text through the --kv cache and a dense one in "
                                      "lockstep: KL(dense || cache) per token (mean, 99th percentile) and top-1 "
                                      "agreement with dense, like llama.cpp's --kl-divergence.")] = False,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Perplexity of MODEL on the first --ctx-size tokens of --file.

    The tokens start with BOS when the file asks for one, as llama.cpp does; every token after the first
    is scored. Prefill alone never touches the compressed part of the cache: use --decode to measure
    what compression costs.
    """
    if file is None:
        raise usage_error("--file", "no text to score: pass --file FILE")
    text = read_text_file(file, "--file")
    m = load_model(model_path(model, model_option), device, dtype, quiet=json_out)
    policy = policy_from_options(m, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    if kld and policy.is_dense:
        raise LeankError("--kld compares a compressed cache with the dense one, so a dense cache has nothing to "
                         "compare: choose one with --kv (e.g. --kv leank+kivi)")
    ids = m.tokenize(text)[:ctx]
    if len(ids) < 2:
        raise LeankError(f"{file}: fewer than 2 tokens to score")
    if len(ids) < ctx and not json_out:
        err.print(f"[yellow]{file} has only {len(ids)} tokens; scoring all of them[/]")
    show = not json_out and err.is_terminal
    if kld:
        with Progress(TextColumn("comparing with dense"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                      TimeRemainingColumn(), console=err, transient=True, disable=not show) as bar:
            task = bar.add_task("kld", total=max(len(ids) - 1 - prefix, 0))
            result = kl_divergence(m, ids, {"policy": policy}, decode_from=prefix,
                                   progress=lambda done, total: bar.update(task, completed=done))["policy"]
        result.update({"model": str(m.path), "file": str(file), "mode": "kld", "policy": policy.as_dict()})
        if json_out:
            print_json(result)
        else:
            out.print(f"KL divergence vs dense over {result['positions']} decoded tokens: mean "
                      f"{result['kld_mean']:.6f} ± {result['kld_stderr']:.6f} nats, 99th percentile "
                      f"{result['kld_p99']:.6f}; top-1 agreement {100 * result['top1_agreement']:.2f} %; decode "
                      f"perplexity {result['decode_perplexity']:.4f} (dense {result['dense_decode_perplexity']:.4f})"
                      f" (KV cache: {policy.describe()})")
        return
    with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not show) as bar:
        task = bar.add_task("ppl", total=len(ids) - 1)
        result = m.perplexity(ids, decode_from=prefix if decode else None, policy=policy,
                              progress=lambda done, total: bar.update(task, completed=done))
    result.update({"model": str(m.path), "file": str(file), "mode": "decode" if decode else "prefill",
                   "policy": policy.as_dict()})
    if json_out:
        print_json(result)
    else:
        out.print(f"perplexity {result['perplexity']:.4f} over {result['scored']} tokens "
                  f"({result['mode']}, KV cache: {policy.describe()})")
