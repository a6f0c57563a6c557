"""`leank mask show` and `leank mask make`: look at masks and make mask files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from typing_extensions import Annotated

from leank.cli.options import AlignOpt, DebugOpt, ForceOpt, JsonOpt, ThreadsOpt, default_model, not_a_directory, one_of
from leank.cli.output import err, files_named_in, mask_report, out, prepare_output, print_json, print_mask_stats
from leank.masks.heatmap import write_heatmap
from leank.masks.spec import read_mask_source, resolve_mask
from leank.runtime.arch import names as architecture_names
from leank.runtime.engine import open_header

SourceArg = Annotated[str, typer.Argument(
    metavar="MASK_OR_MODEL",
    help="A mask file (.safetensors), a LeanK .pth or stage-1 .tsv[:RATIO], a converted .gguf, or with --model "
         "any SPEC (freq:0.7, calib:0.7, ones).", show_default=False)]


def show(
    source: SourceArg,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", metavar="FILE", show_default=False,
                                                  help="The GGUF model the mask is for: gives a LeanK .pth its "
                                                       "channel order, a .tsv its heads, a SPEC its model.")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="NAME", show_default=False,
                                                callback=one_of(architecture_names()),
                                                help="Architecture whose GGUF channel order a LeanK .pth is put in "
                                                     "(llama, qwen2, qwen3), without --model.")] = None,
    align: AlignOpt = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", show_default=False,
                                                help="Also draw the kept channels per layer and head to this PNG "
                                                     "file.")] = None,
    force: ForceOpt = False,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="List the kept count of every head.")] = True,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Statistics of a mask: kept %, heads by kept count, fully pruned heads, estimated K and V savings.

    Examples: leank mask show llama3.1-8b-instruct.pth --arch llama --png mask.png;
    leank mask show out.gguf; leank mask show calib:0.7 --model model.gguf --align 32
    """
    not_a_directory(source, "MASK_OR_MODEL")
    inputs = [model, *files_named_in(source)]
    prepare_output(png, "--png", force=force, inputs=inputs)
    mask = read_mask_source(source, arch=arch, model=model, align=align)
    report = mask_report(mask, source)
    if png is not None:
        w, h = write_heatmap(mask, png, force=force, inputs=inputs)
        report["png"] = {"path": str(png), "width": w, "height": h}
    if json_out:
        print_json(report)
        return
    print_mask_stats(report, f"mask {source}", report["kept_counts"] if layers else None)
    if report["channel_order"] == "hf":
        out.print("[yellow]shown in the file's own (Hugging Face) channel order: pass --arch or --model for a GGUF "
                  "model's order[/]")
    if png is not None:
        err.print(f"wrote {png} ({w}x{h})")


def make(
    spec: Annotated[str, typer.Argument(metavar="SPEC", show_default=False,
                                        help="freq:RATIO, calib:RATIO, ones, a LeanK .pth or .tsv[:RATIO], a mask file "
                                             "or a converted .gguf.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", show_default=False,
                                         help="Mask file to write (.safetensors).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", metavar="FILE", show_default=False,
                                                  help="GGUF model the mask is for (default: the bundled "
                                                       "SmolLM2-135M-Instruct).")] = None,
    align: AlignOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Make the mask SPEC names for a model and save it as a native mask file (for convert, --mask, show).

    Example: leank mask make calib:0.7 --model model.gguf -o model-calib70.safetensors
    """
    not_a_directory(spec, "SPEC")
    inputs = [default_model(model), *files_named_in(spec)]
    prepare_output(output, "--output", force=force, inputs=inputs)
    header = open_header(model)
    with _calibration_bar(spec, quiet=json_out) as progress:
        mask = resolve_mask(spec, header, align, progress=progress)
    mask = mask.with_provenance(extra={**mask.provenance.extra, "arch": header.args.arch})
    mask.save(output, force=force, inputs=inputs)
    report = mask_report(mask, spec)
    report["output"] = str(output)
    if json_out:
        print_json(report)
        return
    print_mask_stats(report, f"wrote {output}")


class _calibration_bar:
    """A transient progress bar for `calib:` specs (a no-op for other specs or off a terminal)."""

    def __init__(self, spec: str, quiet: bool = False):
        self.active = spec.startswith("calib:") and not quiet and err.is_terminal
        self.bar = None

    def __enter__(self):
        if not self.active:
            return None
        self.bar = Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                            TimeRemainingColumn(), console=err, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("calib", total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
