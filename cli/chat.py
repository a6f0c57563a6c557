"""`leank chat`: a multi-turn conversation in the terminal (or one turn per line from a pipe)."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.app import app
from leank.cli.common import (DeviceOpt, DtypeOpt, GroupOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg, RatioOpt, RecentOpt,
                              SinkOpt, VBitsOpt, err, load_model, policy_from_options)

HELP = "/reset starts over, /stats shows speed and memory, /exit quits (Ctrl-D too). Ctrl-C stops a reply."


@app.command()
def chat(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens per reply.")] = 1024,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 40,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per turn (user, assistant, "
                                             "stats): easy to parse when scripting.")] = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
):
    """Chat with MODEL using the chat template stored in the file.

    In a terminal: type a message, Enter sends it. /reset, /stats, /exit; Ctrl-C stops the current reply.
    From a pipe: every line of standard input is one user turn; replies go to standard output, one per turn.
    """
    from leank.errors import LeankError
    from leank.runtime.chat import ChatSession

    interactive = sys.stdin.isatty()
    m = load_model(model, device, dtype, quiet=not interactive)
    policy = policy_from_options(m, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    session = ChatSession(m, system=system, policy=policy)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if interactive:
        err.print(f"[bold]{m.path.name}[/] · {m.args.arch} · KV cache: {policy.describe()}")
        if m.template.is_fallback:
            err.print("[yellow]this file has no chat template; using ChatML[/]")
        err.print(f"[dim]{HELP}[/]")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            err.print("\n[dim](Ctrl-D or /exit quits)[/]")
            continue
        if not interactive and line == "":
            break  # EOF on a pipe
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            break
        if command == "/reset":
            session.reset()
            err.print("[dim]conversation cleared[/]")
            continue
        if command == "/stats":
            show_stats(session, policy)
            continue
        if command in ("/help", "/?"):
            err.print(HELP)
            continue
        try:
            pieces = []
            for step in session.send(text, **sampling):
                if step.text:
                    pieces.append(step.text)
                    if not json_lines:
                        sys.stdout.write(step.text)
                        sys.stdout.flush()
            if json_lines:
                stats = session.last_stats.as_dict() if session.last_stats else {}
                sys.stdout.write(json.dumps({"user": text, "assistant": "".join(pieces), **stats}) + "\n")
            else:
                sys.stdout.write("\n")
            sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            err.print("[dim](reply stopped)[/]")
        except LeankError as e:
            if not interactive:
                raise
            err.print(f"[red]{e}[/]")


def show_stats(session, policy) -> None:
    from leank.cli.common import cache_summary

    s = session.last_stats
    if s is not None:
        err.print(f"last reply: {s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s; "
                  f"prompt {s.prompt_tokens} tokens at {s.prefill_tokens_per_second:.1f} tok/s")
    err.print(cache_summary(policy, session.cache.nbytes().as_dict()))
