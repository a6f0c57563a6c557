"""Options shared by the commands, and turning them into library objects (a model, a cache policy,
sampling parameters). Names follow llama.cpp where it has one: -m/--model, -c/--ctx-size, -t/--threads,
-f/--file, --temp, --top-k, --top-p, --min-p, --repeat-penalty, --presence-penalty, --frequency-penalty."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typing_extensions import Annotated

from leank.cli.output import err, human_bytes as human, memory_sum
from leank.errors import LeankError
from leank.kernels.quant import BITS
from leank.masks.choose import PLANNER_PRESETS, build_policy, planner_policies
from leank.runtime.cache.mask import ALIGNMENTS
from leank.runtime.cache.policy import KINDS
from leank.runtime.defaults import default_model_path
from leank.runtime.engine import DTYPE_NAMES, load
from leank.runtime.generate import SamplingParams
from leank.runtime.memory import first_fitting, loaded_weights, plan_memory

DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}  # the one sampling defaults table

# --- the model ---------------------------------------------------------------------------------------------
ModelArg = Annotated[
    Optional[Path],
    typer.Argument(metavar="MODEL", help="GGUF model file (or -m). Left out: the bundled SmolLM2-135M-Instruct.",
                   show_default=False),
]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", metavar="FILE", show_default=False,
                                                  help="GGUF model file, as llama.cpp's -m (or give it as MODEL).")]


def usage_error(option: str, message: str) -> typer.BadParameter:
    """A usage error about `option` (exit 2, `error: OPTION: message`), for checks in a command's body."""
    return typer.BadParameter(message, param_hint=f"'{option}'")


def one_of(values):
    """An option callback that accepts only `values` (or None): anything else is a usage error naming the
    option and the choices. Repeatable options are checked value by value."""
    allowed = [str(v) for v in values]
    words = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]

    def check(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and str(v) not in allowed:
                raise typer.BadParameter(f"must be {words} (got {v})")
        return value

    return check


def check_device(value: str) -> str:
    """The --device callback: refuses a device name torch would list its device types for."""
    if value is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"must be cpu, cuda, cuda:N or auto (got {value})")
    return value


DeviceOpt = Annotated[str, typer.Option("--device", metavar="NAME", callback=check_device,
                                        help="cpu, cuda (cuda:N), or auto (CUDA when available).")]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option("--dtype", metavar="NAME", help="float32 (CPU default), bfloat16, float16 (CUDA default).",
                 show_default=False, callback=one_of(["auto", *DTYPE_NAMES])),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace OUTPUT if it exists (never an input of the "
                                        "command, a directory or a device).")]


def model_path(positional: Optional[Path], option: Optional[Path]) -> Optional[Path]:
    """MODEL or -m/--model (None: the default model); both given must agree."""
    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"given twice: {positional} and {option}; pass MODEL or -m, not both",
                                 param_hint="'--model'")
    return positional if positional is not None else option


def default_model(path: Optional[Path]) -> Path:
    """`path`, or the bundled default model."""
    return default_model_path() if path is None else path


# --- threads and debugging (every verb, and before the verb) -------------------------------------------------
def busy_cores() -> int:
    """Cores other processes keep busy: the lesser of the 1-minute load average and the processes runnable
    right now besides this one (/proc/loadavg). The average alone would still count a leank run that has
    just ended; the instant count alone, a burst."""
    try:
        average = os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0]) - 1  # "1.02 0.98 0.91 2/345 6789": 2 running
    except (OSError, ValueError, IndexError):
        running = round(average)
    return max(0, min(round(average), running))


def default_threads() -> int:
    """The CPU threads used when none are asked for: one per core this process may run on, less the cores
    other processes keep busy, at least 1. Threads that find their core taken stall every step: on the
    2-core VM with one other busy process, decode ran at 0.9 tok/s on 2 threads and 6 tok/s on 1
    (bench/RESULTS.md, "Threads on a busy machine")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - busy_cores())


def set_threads(value: Optional[int]) -> Optional[int]:
    """Use `value` CPU threads (torch and the C kernels); the option callback of -t/--threads."""
    if value is not None:
        torch.set_num_threads(value)
        os.environ["LEANK_THREADS"] = str(value)  # the same count for every later option and subcommand
    return value


def set_debug(value: bool) -> bool:
    if value:
        os.environ["LEANK_DEBUG"] = "1"
    return value


ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", "-t", min=1, metavar="N", envvar="LEANK_THREADS", callback=set_threads, show_default=False,
    help="CPU threads (default: one per core not kept busy by other processes). Like llama.cpp's -t.")]
DebugOpt = Annotated[bool, typer.Option("--debug", callback=set_debug,
                                        help="Show full tracebacks and llama.cpp's logs.")]

# --- cache policy options (generate, chat, perplexity, eval, info) -------------------------------------------
KvOpt = Annotated[
    Optional[str],
    typer.Option("--kv", metavar="KIND", callback=one_of(KINDS), help="KV cache: dense, leank (pruned K channels), kivi (quantized), "
                 "leank+kivi. Default: what the file embeds (leank convert), else dense.", show_default=False),
]
MaskOpt = Annotated[
    Optional[str],
    typer.Option("--mask", metavar="SPEC", help="Mask for --kv leank: a mask file, a LeanK .pth/.tsv, freq:RATIO "
                 "or calib:RATIO. Default: the file's embedded mask, else the shipped learned mask for the model, "
                 "else freq.", show_default=False),
]
RatioOpt = Annotated[
    Optional[float],
    typer.Option("--ratio", min=0.0, max=1.0, metavar="R", show_default=False,
                 help="Fraction of K channels to prune when a mask is generated (e.g. 0.7)."),
]
KBitsOpt = Annotated[Optional[int], typer.Option("--k-bits", metavar="N", show_default=False, callback=one_of(BITS),
                                                 help="Bits for middle-region K: 2, 4, 8, or 16 (not quantized).")]
VBitsOpt = Annotated[Optional[int], typer.Option("--v-bits", metavar="N", show_default=False, callback=one_of(BITS),
                                                 help="Bits for middle-region V: 2, 4, 8, or 16.")]
GroupOpt = Annotated[Optional[int], typer.Option("--group-size", min=1, metavar="N", show_default=False,
                                                 help="KIVI group: tokens per K scale, channels per V scale.")]
SinkOpt = Annotated[Optional[int], typer.Option("--sink", min=0, metavar="N", show_default=False,
                                                help="First tokens kept in full precision.")]
RecentOpt = Annotated[Optional[int], typer.Option("--recent", min=0, metavar="N", show_default=False,
                                                  help="Last tokens kept in full precision.")]
AlignOpt = Annotated[Optional[int], typer.Option("--align", metavar="N", show_default=False, callback=one_of(ALIGNMENTS),
                                                 help="Kept channels per head are a multiple of this (8, 16 or 32; "
                                                      "default 16) for masks made from scores: freq, calib, .tsv.")]

# --- context and sampling (generate, chat) -------------------------------------------------------------------
CtxSizeOpt = Annotated[Optional[int], typer.Option(
    "--ctx-size", "-c", min=1, metavar="N", show_default=False,
    help="Most tokens the conversation or prompt plus reply may hold (default: the model's context).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, metavar="N", help="Most tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temp", "--temperature", min=0.0, metavar="X",
                                        help="Sampling temperature; 0 = greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, metavar="N", help="Sample from the k likeliest (0 = all).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, metavar="X",
                                        help="Nucleus sampling: the likeliest tokens holding this much probability.")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, metavar="X",
                                        help="Drop tokens less likely than X times the likeliest one (0 = off).")]
RepeatPenaltyOpt = Annotated[float, typer.Option("--repeat-penalty", min=0.0, metavar="X",
                                                 help="Discourage tokens of the last --repeat-last-n (1 = off; "
                                                      "1.1 is a common choice against loops).")]
RepeatLastNOpt = Annotated[int, typer.Option("--repeat-last-n", min=0, metavar="N",
                                             help="Recent tokens the penalties look at.")]
PresenceOpt = Annotated[float, typer.Option("--presence-penalty", metavar="X",
                                            help="Subtracted from a seen token's logit (0 = off).")]
FrequencyOpt = Annotated[float, typer.Option("--frequency-penalty", metavar="X",
                                             help="Subtracted per occurrence of a seen token (0 = off).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", metavar="N", show_default=False,
                                                help="Seed for reproducible sampling.")]
StopOpt = Annotated[Optional[List[str]], typer.Option("--stop", metavar="TEXT", show_default=False,
                                                      help="Stop when this text is generated (repeatable).")]


def sampling_from_options(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                          repeat_last_n: int, presence_penalty: float, frequency_penalty: float,
                          seed: Optional[int]) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, min_p=min_p,
                          repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)


def check_ctx_size(model, ctx_size: Optional[int]) -> int:
    """The context a run may fill: --ctx-size, at most the model's own."""
    limit = model.args.context_length
    if ctx_size is None:
        return limit
    if ctx_size > limit:
        raise LeankError(f"--ctx-size {ctx_size} exceeds the model's context of {limit} tokens")
    return ctx_size


# --- inputs and loading -------------------------------------------------------------------------------------------------
def read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file named by `option`, or one clear error."""
    if str(path) == "-":
        return sys.stdin.read()
    if path.is_dir():
        raise LeankError(f"{option} {path}: is a directory, not a text file")
    if path.exists() and not path.is_file():
        raise LeankError(f"{option} {path}: not a regular file")
    if not path.is_file():
        raise LeankError(f"{option} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LeankError(f"{option} {path}: not UTF-8 text (invalid bytes at offset {e.start})") from None


def load_model(path: Optional[Path], device: str = "auto", dtype: Optional[str] = None, quiet: bool = False):
    """`leank.load` with a transient progress bar on stderr."""
    path = default_model(path)
    if quiet or not err.is_terminal:
        return load(path, device=device, dtype=dtype)
    with Progress(TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(Path(path).name, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return load(path, device=device, dtype=dtype, progress=progress)


def not_a_directory(value, option: str):
    """`value` (a path or a SPEC that may be one), refused with one line when it names a directory."""
    if value is not None and Path(str(value)).is_dir():
        raise LeankError(f"{option} {value}: is a directory, not a file")
    return value


def policy_from_options(model, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent):
    """The cache policy the command line asks for (see `leank.masks.choose.build_policy`)."""
    not_a_directory(mask, "--mask")
    return build_policy(model, kv=kv, mask=mask, ratio=ratio, k_bits=k_bits, v_bits=v_bits, group_size=group_size,
                        sink_tokens=sink, recent_tokens=recent)


# --- the memory budget (info, chat, serve) -------------------------------------------------------------------
SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
              "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '512 MiB', '2G', '1.5g', '1000000' -> bytes (K/M/G/T alone are binary, as llama.cpp and
    free -h mean them; KB/MB/GB decimal)."""
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    size = value * SIZE_UNITS.get(unit, 0)
    if not 1 <= size <= 2**62:  # an unknown unit, zero, negative, nan or absurd
        raise LeankError(f"--memory {text!r}: give a size such as 8GiB, 512MiB or 2G")
    return int(size)


def check_size(value: Optional[str]) -> Optional[str]:
    """The --memory callback: a size, or one usage line naming the option."""
    if value is not None:
        try:
            parse_size(value)
        except LeankError:
            raise typer.BadParameter(f"give a size such as 8GiB, 512MiB or 2G (got {value})") from None
    return value


def memory_option(help: str):
    """--memory SIZE, with the command's own help."""
    return typer.Option("--memory", metavar="SIZE", callback=check_size, show_default=False, help=help)


CANDIDATES = ", ".join(name for name, _ in PLANNER_PRESETS)  # for help texts
MemoryOpt = Annotated[Optional[str], memory_option(
    "Memory budget for the weights, the KV cache at --ctx-size and the working set (e.g. 8GiB, 512MiB, 2G). "
    f"Without --kv: the least compressed cache ({CANDIDATES}) that fits; with --kv: that cache, refused if it "
    "cannot fit. See leank info --memory.")]


def policy_choice_given(kv, mask, ratio, k_bits, v_bits) -> bool:
    """Whether the command line chose a cache policy (the memory planner then only checks it)."""
    return any(x is not None for x in (kv, mask, ratio, k_bits, v_bits))


def policy_within_memory(model, memory: Optional[str], context: int, kv, mask, ratio, k_bits, v_bits, group_size, sink,
                         recent, *, parallel: int = 1, prefill_rows: Optional[int] = None):
    """The cache policy a run uses. Without --memory: the command line's (`policy_from_options`). With
    it: the least compressed of `planner_policies` whose weights + `parallel` caches at `context` tokens
    + working set (of a `prefill_rows`-token prefill; None: the whole context) fit, said in one line on
    stderr; when the command line chose a policy, that one, refused if it cannot fit."""
    if memory is None:
        return policy_from_options(model, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    budget = parse_size(memory)

    def plan(candidates):
        return plan_memory(candidates, model.args, loaded_weights(model.transformer), device=model.device,
                           dtype=model.dtype, budget=budget, context=context, parallel=parallel, rows=prefill_rows)

    def planned():
        return plan(planner_policies(model, group_size=group_size, sink_tokens=sink, recent_tokens=recent))

    given = policy_choice_given(kv, mask, ratio, k_bits, v_bits)
    if given:
        policy = policy_from_options(model, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
        rows = plan([(policy.kind, policy)])
    else:
        rows = planned()
    row = first_fitting(rows)
    if row is None:
        small = min(rows, key=lambda r: r.total)
        fix = ", fewer --parallel" if parallel > 1 else ""
        if given:
            other = first_fitting(planned())  # would the planner have found one?
            fix += f", or no --kv (--memory would choose {other.name})" if other is not None else ""
        what = f"the {small.name} cache you chose" if given else f"no cache fits: the smallest, {small.name},"
        raise LeankError(f"--memory {memory}: {what} needs {memory_sum(small, context, parallel)}, "
                         f"{human(-small.margin)} over the budget of {human(budget)}; try a shorter --ctx-size{fix}")
    named = row.name if row.policy.describe() == row.name else f"{row.name} ({row.policy.describe()})"
    err.print(f"[dim]memory: {named} fits {human(budget)}: {memory_sum(row, context, parallel)}, "
              f"{human(row.margin)} to spare[/]", highlight=False)
    return row.policy
