"""`leank convert` (embed a mask and cache settings in a GGUF) and `leank inspect` (read them back)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from typing_extensions import Annotated

from leank.cli.options import (AlignOpt, DebugOpt, ForceOpt, GroupOpt, JsonOpt, KBitsOpt, ModelArg, ModelOpt,
                               RecentOpt, SinkOpt, ThreadsOpt, VBitsOpt, default_model, model_path, not_a_directory,
                               usage_error)
from leank.cli.output import (err, files_named_in, human_bytes, out, prepare_output, print_json, print_mask_stats,
                              print_summary)
from leank.convert.convert import convert as run_convert
from leank.convert.convert import inspect_file
from leank.errors import LeankError


def convert(
    model: ModelArg = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE", show_default=False,
                                                   help="GGUF file to write.")] = None,
    mask: Annotated[Optional[str], typer.Option(
        "--mask", metavar="SPEC", show_default=False,
        help="freq:RATIO, calib:RATIO, a mask file, a LeanK .pth or .tsv[:RATIO], a converted .gguf, ones, "
        "or none (quantization settings only). Default: the input's embedded mask, else the learned mask "
        "shipped for the model, else an error.")] = None,
    align: AlignOpt = None,
    k_bits: KBitsOpt = None, v_bits: VBitsOpt = None, group_size: GroupOpt = None, sink: SinkOpt = None,
    recent: RecentOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Write a copy of MODEL with a K-channel mask and KV-cache settings embedded as leank.* metadata.

    Tensors and existing metadata are copied unchanged (stock llama.cpp runs the output as before);
    leank uses the embedded settings automatically, command-line options still override them.
    Unset settings keep the input's embedded ones, else the defaults (no quantization).

    Example: leank convert model.gguf --mask freq:0.7 --k-bits 4 --v-bits 4 -o model-leank.gguf
    """
    if output is None:
        raise usage_error("--output", "no output file: pass -o OUT.gguf")
    src = default_model(model_path(model, model_option))
    not_a_directory(mask, "--mask")
    prepare_output(output, "--output", force=force, inputs=[src, *files_named_in(mask)])
    show = not json_out and err.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err,
                  transient=True, disable=not show) as bar:
        calib = bar.add_task("calibrating", total=None, visible=False)
        copy = bar.add_task(f"writing {output.name}", total=None, visible=False)

        def mask_progress(done: int, total: int) -> None:
            bar.update(calib, completed=done, total=total, visible=True)

        def progress(done: int, total: int) -> None:
            bar.update(calib, visible=False)
            bar.update(copy, completed=done, total=total, visible=True)

        result = run_convert(src, output, mask, align=align, k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                             sink_tokens=sink, recent_tokens=recent, force=force, progress=progress,
                             mask_progress=mask_progress)
    if json_out:
        print_json(result.as_dict())
        return
    for note in result.notes:
        err.print(f"[yellow]{note}[/]")
    origin = {"embedded": " (kept from the input)", "shipped": " (learned mask shipped for this model)"}
    out.print(f"wrote [bold]{output}[/]: {human_bytes(result.bytes_written)} in {result.copy_seconds:.2f} s "
              f"({result.mb_per_second:.0f} MB/s)")
    out.print(f"KV cache: {result.policy.describe()}{origin.get(result.mask_origin, '')}")


def inspect(
    file: Annotated[Optional[Path], typer.Argument(metavar="FILE", show_default=False,
                                                   help="GGUF file, converted or not (or -m).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx-size", "--ctx", "-c", min=1, metavar="N", show_default=False,
                                               help="Context length for the KV bytes (default: the model's).")] = None,
    json_out: JsonOpt = False,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """The model summary plus the leank.* metadata: policy, mask statistics, and the KV bytes per token they imply."""
    s = inspect_file(model_path(file, model_option), ctx)
    if json_out:
        print_json(s)
        return
    print_summary(s)
    lk = s["leank"]
    out.print()
    if lk is None:
        out.print("[bold]leank metadata[/]: none (a plain GGUF file; leank convert embeds a mask and cache settings)")
        return
    p = lk["policy"]
    out.print(f"  fingerprint of the K projections matches: {'yes' if lk['fingerprint_matches'] else 'NO'}")
    out.print(f"  cache policy: {p['kind']}; K {p['k_bits']}-bit, V {p['v_bits']}-bit, group {p['group_size']}, "
              f"sink {p['sink_tokens']}, recent {p['recent_tokens']}, block {p['block_tokens']}")
    kv = lk["kv_bytes_per_token"]
    middle = f"{kv['middle_region']:.1f} B/token in the middle region, " if kv["middle_region"] is not None else ""
    out.print(f"  KV bytes: {kv['fp16_dense']:.0f} B/token dense fp16; {middle}"
              f"{kv['average_at_context']:.1f} B/token on average at {kv['context']} tokens")
    if lk["mask"] is not None:
        out.print()
        print_mask_stats(lk["mask"], "embedded mask")
