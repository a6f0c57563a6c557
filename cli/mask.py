"""`leank mask ...`: look at masks and make mask files. Other mask verbs (e.g. `train`) register on
`mask_app` from their own modules."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.app import app
from leank.cli.common import JsonOpt, ModelArg, err, out, print_json

mask_app = typer.Typer(
    name="mask",
    help="Make, import and look at K-channel masks.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(mask_app, name="mask")

AlignOpt = Annotated[Optional[int], typer.Option("--align", help="Kept channels per head are a multiple of this "
                                                 "(8, 16 or 32; default 16) for masks made from scores: freq, calib, .tsv.",
                                                 show_default=False)]
SourceArg = Annotated[str, typer.Argument(
    metavar="MASK_OR_MODEL",
    help="A mask file (.safetensors), a LeanK .pth or stage-1 .tsv[:RATIO], a converted .gguf, or with --model "
         "any SPEC (freq:0.7, calib:0.7, ones).", show_default=False)]


def mask_report(mask, source: str) -> dict:
    """What `mask show --json` prints: the statistics plus per-head counts and channel order."""
    counts = mask.kept_counts()
    order = "hf" if mask.provenance.extra.get("channel_order") == "hf" else "gguf"
    return {"source": source, "channel_order": order, **mask.stats(),
            "kept_counts": counts.tolist(),
            "fully_pruned": [[int(l), int(h)] for l, h in (counts == 0).nonzero().tolist()]}


def print_mask_stats(stats: dict, title: str | None = None, per_layer: list | None = None) -> None:
    """The rich rendering of `Mask.stats()` (used by `mask show` and `inspect`)."""
    from rich.table import Table

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


@mask_app.command("show")
def show(
    source: SourceArg,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="The GGUF model the mask is for: gives a LeanK "
                                                  ".pth its channel order, a .tsv its heads, a SPEC its model.",
                                                  show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture whose GGUF channel order a LeanK .pth is "
                                                "put in (llama, qwen2, qwen3), without --model.", show_default=False)] = None,
    align: AlignOpt = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also draw the kept channels per layer and head to this "
                                                "PNG file.", show_default=False)] = None,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="List the kept count of every head.")] = True,
    json_out: JsonOpt = False,
):
    """Statistics of a mask: kept %, heads by kept count, fully pruned heads, estimated K and V savings.

    Examples: leank mask show llama3.1-8b-instruct.pth --arch llama --png mask.png;
    leank mask show out.gguf; leank mask show calib:0.7 --model model.gguf --align 32
    """
    from leank.masks.spec import read_mask_source

    mask = read_mask_source(source, arch=arch, model=model, align=align)
    report = mask_report(mask, source)
    if png is not None:
        from leank.masks.heatmap import write_heatmap

        w, h = write_heatmap(mask, png)
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


@mask_app.command("make")
def make(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="freq:RATIO, calib:RATIO, ones, a LeanK .pth or "
                                        ".tsv[:RATIO], a mask file or a converted .gguf.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask file to write (.safetensors).",
                                         show_default=False)],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF model the mask is for (default: the "
                                                  "bundled SmolLM2-135M-Instruct).", show_default=False)] = None,
    align: AlignOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUTPUT if it exists.")] = False,
    json_out: JsonOpt = False,
):
    """Make the mask SPEC names for a model and save it as a native mask file (for convert, --mask, show).

    Example: leank mask make calib:0.7 --model model.gguf -o model-calib70.safetensors
    """
    from leank.errors import LeankError
    from leank.masks.spec import resolve_mask
    from leank.runtime.engine import open_header

    if output.exists() and not force:
        raise LeankError(f"{output}: already exists (use --force to overwrite)")
    header = open_header(model)
    with _calibration_bar(spec, quiet=json_out) as progress:
        mask = resolve_mask(spec, header, align, progress=progress)
    mask = mask.with_provenance(extra={**mask.provenance.extra, "arch": header.args.arch})
    try:
        mask.save(output)
    except OSError as e:
        raise LeankError(f"{output}: cannot write ({e.strerror or e})") from None
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
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                            TimeRemainingColumn(), console=err, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("calib", total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
