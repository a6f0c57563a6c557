"""Options shared by several commands, and loading a model with a progress bar."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, highlight=False)

ModelArg = Annotated[
    Optional[Path],
    typer.Argument(help="GGUF model file. Left out: the bundled SmolLM2-135M-Instruct.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, or auto (CUDA when available).")]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option("--dtype", help="float32 (CPU default), bfloat16, float16 (CUDA default).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]

# --- cache policy options (generate, chat, perplexity, eval, info) -------------------------------
KvOpt = Annotated[
    Optional[str],
    typer.Option("--kv", help="KV cache: dense, leank (pruned K channels), kivi (quantized), leank+kivi. "
                 "Default: what the file embeds (leank convert), else dense.", show_default=False),
]
MaskOpt = Annotated[
    Optional[str],
    typer.Option("--mask", help="Mask for --kv leank: a mask file, a LeanK .pth/.tsv, freq:RATIO or calib:RATIO. "
                 "Default: the file's embedded mask, else the shipped learned mask for the model, else freq.",
                 show_default=False),
]
RatioOpt = Annotated[
    Optional[float],
    typer.Option("--ratio", help="Fraction of K channels to prune when a mask is generated (e.g. 0.7).", show_default=False),
]
KBitsOpt = Annotated[Optional[int], typer.Option("--k-bits", help="Bits for middle-region K: 2, 4, 8, or 16 (not quantized).", show_default=False)]
VBitsOpt = Annotated[Optional[int], typer.Option("--v-bits", help="Bits for middle-region V: 2, 4, 8, or 16.", show_default=False)]
GroupOpt = Annotated[Optional[int], typer.Option("--group-size", help="KIVI group: tokens per K scale, channels per V scale.", show_default=False)]
SinkOpt = Annotated[Optional[int], typer.Option("--sink", help="First tokens kept in full precision.", show_default=False)]
RecentOpt = Annotated[Optional[int], typer.Option("--recent", help="Last tokens kept in full precision.", show_default=False)]


def load_model(path: Optional[Path], device: str = "auto", dtype: Optional[str] = None, quiet: bool = False):
    """`leank.load` with a transient progress bar on stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from leank.runtime.engine import load
    from leank.runtime.tokenizer import default_model_path

    path = default_model_path() if path is None else path
    if quiet or not err.is_terminal:
        return load(path, device=device, dtype=dtype)
    with Progress(TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(Path(path).name, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return load(path, device=device, dtype=dtype, progress=progress)


def policy_from_options(model, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent):
    """The cache policy the command line asks for (see `leank.runtime.policy.build_policy`)."""
    from leank.runtime.policy import build_policy

    return build_policy(model, kv=kv, mask=mask, ratio=ratio, k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                        sink_tokens=sink, recent_tokens=recent)


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
