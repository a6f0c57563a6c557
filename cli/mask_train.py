"""`leank mask train` and `leank mask examples`: LeanK's two-stage mask training."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typing_extensions import Annotated

from leank.cli.options import (AlignOpt, DebugOpt, DeviceOpt, DtypeOpt, ForceOpt, ModelArg, ModelOpt, ThreadsOpt,
                               default_model, load_model, model_path, not_a_directory, one_of, usage_error)
from leank.cli.output import err, out, prepare_output
from leank.errors import LeankError
from leank.masks.train import TrainConfig, generated_examples, load_examples, save_examples, train_mask
from leank.runtime import defaults
from leank.runtime.engine import load

STAGES = {"1": (1,), "2": (2,), "both": (1, 2)}


def train(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Mask file to write (.safetensors).",
                                         show_default=False)] = None,
    ratio: Annotated[float, typer.Option("--ratio", min=0.0, max=1.0, metavar="R",
                                         help="Fraction of K channels to prune.")] = defaults.RATIO,
    align: AlignOpt = None,
    steps: Annotated[int, typer.Option("--steps", min=1, metavar="N", help="Training steps per stage.")] = 1000,
    stage: Annotated[str, typer.Option("--stage", metavar="1|2|both", callback=one_of(STAGES),
                                       help="1 (scaling factors), 2 (binarized, straight-through) or both.")] = "both",
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, metavar="X", show_default=False,
                                                help="Stage-1 learning rate (stage 2: half). "
                                                "Default 0.02 for llama, 0.04 for qwen (LeanK).")] = None,
    lam: Annotated[float, typer.Option("--lambda", min=0.0, metavar="X",
                                       help="Stage-1 sparsity weight on mean(alpha).")] = 0.06,
    min_tokens: Annotated[int, typer.Option("--min-tokens", min=1, metavar="N", help="Shortest training context.")] = 1024,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, metavar="N", show_default=False,
                                                      help="Longest training context (default: the model's context, "
                                                           "at most 8192).")] = None,
    sink: Annotated[Optional[int], typer.Option("--sink", min=0, metavar="N", show_default=False,
                                                help="Unscaled first tokens (default: the cache policy's).")] = None,
    recent: Annotated[Optional[int], typer.Option("--recent", min=0, metavar="N", show_default=False,
                                                  help="Unscaled last tokens (default: the cache policy's).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", metavar="FILE", help="Pre-tokenized examples (`leank mask examples`); "
                                                 "default: generated on the fly.", show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", metavar="FILE", help="Checkpoint file (default: OUTPUT.ckpt).",
                                                       show_default=False)] = None,
    every: Annotated[int, typer.Option("--checkpoint-every", min=1, metavar="N", help="Steps between checkpoints.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint (same settings).")] = False,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed for the training data.")] = 0,
    force: ForceOpt = False,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Learn a K-channel mask for MODEL with LeanK's two-stage training (weights frozen).

    Stage 1 learns a scaling factor per (layer, KV head, channel) on synthetic retrieval tasks (multi-key
    needles, multi-value); stage 2 binarizes them at --ratio and --align and trains on through a
    straight-through estimator. Deterministic with --seed; --resume continues from the checkpoint.
    The result is a mask file for `leank convert --mask` and `--mask` on every command.

    Example: leank mask train --ratio 0.7 --align 16 --steps 300 -o smollm2.safetensors
    """
    if output is None:
        raise usage_error("--output", "pass --output FILE.safetensors for the trained mask")
    model = model_path(model, model_option)
    src = default_model(model)
    ckpt = checkpoint or output.with_name(output.name + ".ckpt")
    not_a_directory(data, "--data")
    # every path is checked before the model loads: a bad one must not cost a training run
    prepare_output(output, "--output", force=force, inputs=[src, data, ckpt])
    prepare_output(ckpt, "--checkpoint", force=True, inputs=[src, data, output])
    if ckpt.exists() and not (resume or force):
        raise LeankError(f"--checkpoint {ckpt}: already exists; --resume continues from it, --force starts over")
    stages = STAGES[stage]
    torch.manual_seed(seed)
    m = load_model(model, device, dtype)
    if m.device.type == "cpu" and m.dtype == torch.float32:
        m = load(m.path, device="cpu", weights="float32")  # gradients need plain float32 matrices
    a = m.args
    examples = load_examples(data) if data is not None else None
    cfg = TrainConfig(ratio=ratio, align=align or defaults.ALIGN, steps=steps, stages=stages, lr=lr, lam=lam, min_tokens=min_tokens,
                      max_tokens=max_tokens or min(a.context_length, 8192), seed=seed, checkpoint_every=every,
                      sink_tokens=sink if sink is not None else defaults.SINK_TOKENS,
                      recent_tokens=recent if recent is not None else defaults.default_recent(a.context_length))
    total = steps * len(stages)
    with Progress(TextColumn("stage {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4g}  mse {task.fields[mse]:.3g}  mean α {task.fields[alpha]:.3f}  "
                             "α<0.05 {task.fields[zero]:.0%}"),
                  TimeRemainingColumn(), console=err, transient=False) as bar:
        task = bar.add_task("train", total=total, stage=stages[0], loss=0.0, mse=0.0, alpha=1.0, zero=0.0)

        def progress(r: dict) -> None:
            done = (stages.index(r["stage"])) * steps + r["step"]
            bar.update(task, completed=done, stage=r["stage"], loss=r["loss"], mse=r["mse"], alpha=r["mean_alpha"],
                       zero=r["near_zero"])

        mask, history = train_mask(m, cfg, examples, checkpoint=ckpt, resume=resume, progress=progress)
    mask.save(output, force=force, inputs=[src, data, ckpt])
    seconds = sum(h["seconds"] for h in history)
    s = mask.stats()
    out.print(f"wrote {output}: {100 * s['pruned_fraction']:.1f} % of K channels pruned, "
              f"{s['fully_pruned_heads']} of {s['heads']} heads fully pruned, heads by kept count "
              f"{s['heads_by_kept_count']}; {len(history)} steps in {seconds:.0f} s")


def examples(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="File to write.",
                                         show_default=False)] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, metavar="N", help="Examples (steps x stages).")] = 2000,
    min_tokens: Annotated[int, typer.Option("--min-tokens", min=1, metavar="N", help="Shortest context.")] = 1024,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, metavar="N", show_default=False,
                                                      help="Longest context (default: the model's, at most 8192).")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed for the examples.")] = 0,
    force: ForceOpt = False,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Write pre-tokenized training examples, for training on a machine without the tokenizer."""
    if output is None:
        raise usage_error("--output", "pass --output FILE")
    model = default_model(model_path(model, model_option))
    prepare_output(output, "--output", force=force, inputs=[model])
    m = load_model(model, "cpu")
    cfg = TrainConfig(min_tokens=min_tokens, max_tokens=max_tokens or min(m.args.context_length, 8192), seed=seed)
    gen = generated_examples(m, cfg)
    exs = []
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("generating", total=count)
        for i in range(count):
            exs.append(gen(i))
            bar.advance(task)
    save_examples(exs, output, force=force, inputs=[model])
    out.print(f"wrote {count} examples ({sum(len(e.prefix) + len(e.answer) for e in exs)} tokens) to {output}")
