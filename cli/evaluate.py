"""`leank eval`: synthetic long-context tasks and decode perplexity, several cache policies side by side."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typing_extensions import Annotated

from leank.cli.options import (DebugOpt, DeviceOpt, DtypeOpt, ForceOpt, GroupOpt, ModelArg, ModelOpt, RecentOpt,
                               SinkOpt, ThreadsOpt, default_model, load_model, model_path, one_of, read_text_file)
from leank.cli.output import err, files_named_in, out, prepare_output
from leank.errors import LeankError
from leank.masks.choose import parse_policies
from leank.masks.evaluate import PROTOCOLS, check_policies, decode_perplexity, evaluate, summarize
from leank.masks.tasks import HAYSTACKS, SPLITS, TASKS, make_samples
from leank.runtime.outputs import write_text


def eval_(
    model: ModelArg = None,
    task: Annotated[Optional[List[str]], typer.Option("--task", "-T", metavar="NAME", callback=one_of(TASKS), help="passkey, multikey, multivalue or vartrack "
                    "(repeat for several).", show_default="passkey")] = None,
    length: Annotated[Optional[List[int]], typer.Option("--length", "-l", min=1, metavar="N", help="Prompt length in tokens (repeat).",
                      show_default="2048")] = None,
    depth: Annotated[Optional[List[float]], typer.Option("--depth", "-d", min=0.0, max=1.0, metavar="X", help="Depth of the asked-for needle, 0 = "
                     "start of the document, 1 = end (repeat).", show_default="0.5")] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", min=1, metavar="N", help="Samples per task, length and depth.")] = 1,
    policy: Annotated[Optional[List[str]], typer.Option("--policy", "-p", metavar="SPEC", help="Cache policy SPEC (repeat): dense, "
                      "kivi4, kivi2, leank:freq:0.5, leank:freq:0.7+kivi4, leank:MASKFILE+kivi2; options after "
                      "commas: kivi2,recent=256,group=64.", show_default="dense, kivi4")] = None,
    split: Annotated[str, typer.Option("--split", metavar="NAME", callback=one_of(SPLITS), help="eval (held out) or train prompts.")] = "eval",
    haystack: Annotated[str, typer.Option("--haystack", metavar="NAME", callback=one_of(HAYSTACKS), help="Filler: faker (varied prose) or repeat (simple "
                        "sentences).")] = "faker",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Picks the samples (same seed, same prompts).")] = 0,
    protocol: Annotated[str, typer.Option("--protocol", metavar="NAME", callback=one_of(PROTOCOLS), help="conversation: the question is a second chunk that "
                        "attends to the compressed document; prefill: document and question prefilled together, "
                        "only the answer sees compression (LeanK's setting).")] = "conversation",
    ppl_file: Annotated[Optional[Path], typer.Option("--ppl-file", metavar="FILE", help="Also measure decode perplexity on the "
                        "first --ppl-ctx tokens of this UTF-8 text.", show_default=False)] = None,
    ppl_ctx: Annotated[int, typer.Option("--ppl-ctx", min=2, metavar="N", help="Tokens scored for --ppl-file.")] = 2048,
    ppl_prefix: Annotated[int, typer.Option("--ppl-prefix", min=1, metavar="N", help="Tokens prefilled before decoding.")] = 64,
    json_out: Annotated[Optional[Path], typer.Option("--json-out", metavar="FILE", help="Write settings and every sample's "
                        "result to this JSON file.", show_default=False)] = None,
    force: ForceOpt = False,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Retrieval accuracy of cache policies on synthetic long-context tasks (and decode perplexity).

    Each sample's document is prefilled once, densely; every policy then compresses that cache, takes the
    question as a second chunk and greedy-decodes the answer. The table shows exact-match accuracy (%)
    per task and length; the JSON has every reply.
    """
    tasks, lengths, depths = task or ["passkey"], length or [2048], depth or [0.5]
    specs = policy or ["dense", "kivi4"]
    model = model_path(model, model_option)
    prepare_output(json_out, "--json-out", force=force, inputs=[default_model(model), ppl_file, *files_named_in(*specs)])
    ppl_text = read_text_file(ppl_file, "--ppl-file") if ppl_file is not None else None

    m = load_model(model, device, dtype)
    for n in lengths:
        if n > m.args.context_length:
            raise LeankError(f"--length {n} exceeds the model's context of {m.args.context_length} tokens")
    policies = parse_policies(specs, m, sink_tokens=sink, recent_tokens=recent, group_size=group_size)
    check_policies(policies, m)
    sample_list = list(make_samples(m, tasks, lengths, depths, samples, seed=seed, split=split, haystack=haystack))
    ppl_ids = None
    if ppl_text is not None:
        ppl_ids = m.tokenize(ppl_text)[:ppl_ctx]
        if len(ppl_ids) <= ppl_prefix + 1:
            raise LeankError(f"{ppl_file}: {len(ppl_ids)} tokens leave nothing to decode after --ppl-prefix {ppl_prefix}")
    for name, p in policies.items():
        if not p.is_dense and p.sink_tokens + p.recent_tokens >= max(lengths):
            err.print(f"[yellow]policy {name}: sink + recent ({p.sink_tokens + p.recent_tokens}) cover the whole "
                      f"prompt; nothing is compressed[/]")

    show = err.is_terminal
    started = datetime.now(timezone.utc)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not show) as bar:
        job = bar.add_task("evaluating", total=len(sample_list) * len(policies))
        records = evaluate(m, sample_list, policies, protocol,
                           progress=lambda done, total, what: bar.update(job, completed=done, description=what))
        ppl = None
        if ppl_ids is not None:
            job = bar.add_task("perplexity", total=len(policies) * (len(ppl_ids) - 1))
            base = {name: i * (len(ppl_ids) - 1) for i, name in enumerate(policies)}
            ppl = decode_perplexity(m, ppl_ids, policies, decode_from=ppl_prefix,
                                    progress=lambda d, t, name: bar.update(job, completed=base[name] + d,
                                                                           description=f"perplexity {name}"))
    rows = summarize(records, list(policies))
    _print_table(rows, list(policies), ppl)
    if json_out is not None:
        result = {
            "settings": {"model": str(m.path), "tasks": tasks, "lengths": lengths, "depths": depths, "samples": samples,
                         "split": split, "haystack": haystack, "seed": seed, "protocol": protocol,
                         "device": str(m.device),
                         "dtype": str(m.dtype).replace("torch.", ""), "started": started.isoformat(timespec="seconds"),
                         "policies": {name: p.as_dict() for name, p in policies.items()},
                         "ppl_file": None if ppl_file is None else str(ppl_file), "ppl_ctx": ppl_ctx,
                         "ppl_prefix": ppl_prefix},
            "summary": rows,
            "perplexity": ppl,
            "samples": records,
        }
        write_text(json_out, json.dumps(result, indent=2, default=str) + "\n", force=force, what="--json-out",
                   inputs=[m.path, ppl_file, *files_named_in(*specs)])
        err.print(f"wrote {json_out}")


def _print_table(rows: list[dict], policies: list[str], ppl: dict | None) -> None:
    table = Table(title="accuracy (%; mean score in parentheses when it differs)")
    table.add_column("task")
    table.add_column("length", justify="right")
    table.add_column("n", justify="right")
    for p in policies:
        table.add_column(p, justify="right", overflow="fold")
    for row in rows:
        cells = []
        for p in policies:
            acc, sc = row["accuracy"][p], row["score"][p]
            cells.append(f"{acc:.0f}" + (f" ({sc:.0f})" if abs(sc - acc) > 0.5 else ""))
        table.add_row(row["task"], str(row["length"]), str(row["samples"]), *cells)
    if ppl is not None:
        table.add_section()
        first = ppl[policies[0]]
        # the decoded tokens only: the prefilled prefix is scored identically under every policy
        table.add_row("decode ppl", str(first.get("decoded", first["tokens"])), "",
                      *[_ppl(ppl[p].get("decode_perplexity", ppl[p]["perplexity"])) for p in policies])
    # piped output has no terminal width: make room for the policies' names rather than fold them
    width = None if out.is_terminal else max(out.width, 30 + sum(max(len(p), 6) + 3 for p in policies))
    out.print(table, width=width)


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e4 else f"{value:.3g}"
