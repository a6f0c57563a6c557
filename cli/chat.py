"""`leank chat`: a multi-turn conversation in the terminal (or one turn per line from a pipe).

In a terminal the input line edits like a shell's (prompt_toolkit: arrows, history, Ctrl-A/E, Ctrl-R),
and a paste of several lines is one turn (bracketed paste). Everywhere, a line starting with three
double quotes opens a block that runs to the line ending with them, as in llama.cpp and ollama.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.options import (DEFAULTS, CtxSizeOpt, DebugOpt, DeviceOpt, DtypeOpt, FrequencyOpt, GroupOpt, KBitsOpt,
                               KvOpt, MaskOpt, MaxTokensOpt, MemoryOpt, MinPOpt, ModelArg, ModelOpt, PresenceOpt,
                               RatioOpt, RecentOpt, RepeatLastNOpt, RepeatPenaltyOpt, SeedOpt, SinkOpt, StopOpt,
                               TempOpt, ThreadsOpt, TopKOpt, TopPOpt, VBitsOpt, check_ctx_size, load_model, model_path,
                               policy_within_memory, read_text_file, sampling_from_options)
from leank.cli.output import cache_summary, err, human_bytes
from leank.errors import LeankError
from leank.runtime.chat import ChatSession
from leank.runtime.outputs import check_output

BLOCK = '"""'
COMMANDS = {
    "/help": "this list",
    "/file PATH": "send a UTF-8 text file as your next message",
    "/reset": "start a new conversation",
    "/save [FILE]": "save the conversation and its cache (default: the --session file)",
    "/load FILE": "resume a saved conversation",
    "/stats": "speed of the last reply and the cache's memory",
    "/exit": "quit (Ctrl-D, /quit and /bye too)",
}
HELP = ("Enter sends; a paste of several lines is one message; \"\"\" opens and closes a multi-line block. "
        "Ctrl-C stops a reply (the conversation stays). " + " · ".join(COMMANDS) + ". Start a line with // to "
        "send text that begins with /.")


class LineReader:
    """Reads one user turn at a time: `read()` returns its text, or None at the end of the input.

    A terminal gets prompt_toolkit's line editor (history kept in memory only: conversations are not
    written to disk); a pipe is read line by line.
    """

    def __init__(self, terminal: bool):
        self.prompt = None
        if terminal:
            from prompt_toolkit import PromptSession  # only an interactive terminal needs it
            from prompt_toolkit.history import InMemoryHistory

            self.prompt = PromptSession(history=InMemoryHistory())

    def _line(self, continuation: bool) -> Optional[str]:
        if self.prompt is not None:
            try:
                return self.prompt.prompt("... " if continuation else "> ")
            except EOFError:
                return None
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def read(self) -> Optional[str]:
        line = self._line(False)
        if line is None or not line.lstrip().startswith(BLOCK):
            return line
        body = line.lstrip()[len(BLOCK):]
        if body.rstrip().endswith(BLOCK) and body.strip():  # """one line"""
            return body.rstrip()[: -len(BLOCK)]
        lines = [body] if body.strip() else []
        while True:
            more = self._line(True)
            if more is None:  # the input ended inside the block: send what there is
                break
            if more.rstrip().endswith(BLOCK):
                lines.append(more.rstrip()[: -len(BLOCK)])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")


class StopOnCtrlC:
    """While a reply streams, the first Ctrl-C asks for a stop after the current token (the conversation's
    cache stays whole); a second one interrupts at once."""

    def __enter__(self):
        self.pressed = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C interrupts as usual
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def chat(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", show_default=False,
                                                  help="System prompt.")] = None,
    max_tokens: MaxTokensOpt = 1024,
    ctx_size: CtxSizeOpt = None,
    temperature: TempOpt = DEFAULTS["temperature"],
    top_k: TopKOpt = DEFAULTS["top_k"],
    top_p: TopPOpt = DEFAULTS["top_p"],
    min_p: MinPOpt = DEFAULTS["min_p"],
    repeat_penalty: RepeatPenaltyOpt = DEFAULTS["repeat_penalty"],
    repeat_last_n: RepeatLastNOpt = DEFAULTS["repeat_last_n"],
    presence_penalty: PresenceOpt = DEFAULTS["presence_penalty"],
    frequency_penalty: FrequencyOpt = DEFAULTS["frequency_penalty"],
    seed: SeedOpt = None,
    stop: StopOpt = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per turn (user, assistant, "
                                             "stats): easy to parse when scripting.")] = False,
    session_file: Annotated[Optional[Path], typer.Option(
        "--session", metavar="FILE", show_default=False,
        help="Resume the conversation saved in FILE (if it exists) and save it there after every reply: "
             "the compressed cache comes back without re-reading the conversation.")] = None,
    memory: MemoryOpt = None,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Chat with MODEL using the chat template stored in the file.

    In a terminal: Enter sends, the arrows edit and recall earlier lines, a paste of several lines is one
    message, and a block between lines of \"\"\" is one message. /file PATH sends a text file; /reset,
    /stats, /help, /exit. Ctrl-C stops the current reply and keeps the conversation.

    From a pipe: every line of standard input is one user turn (or a \"\"\" block); replies go to
    standard output, one per turn.
    """
    interactive = sys.stdin.isatty()
    m = load_model(model_path(model, model_option), device, dtype, quiet=not interactive)
    limit = check_ctx_size(m, ctx_size)
    policy = policy_within_memory(m, memory, limit, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    session = ChatSession(m, system=system, policy=policy, context_length=limit)
    if session_file is not None:
        check_output(session_file, force=True, inputs=[m.path], what="--session")  # before any turn
        if session_file.exists():
            session.load(session_file)
            if interactive:
                err.print(f"[dim]resumed {session_file}: {len(session.messages)} messages, "
                          f"{session.cache.seq_len} tokens[/]")
    options = dict(max_tokens=max_tokens, stop=stop or (),
                   sampling=sampling_from_options(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                                  presence_penalty, frequency_penalty, seed))
    reader = LineReader(interactive and sys.stdout.isatty())
    if interactive:
        err.print(f"[bold]{m.path.name}[/] · {m.args.arch} · KV cache: {policy.describe()}")
        if m.template.is_fallback:
            err.print("[yellow]this file has no chat template; using ChatML[/]")
        err.print(f"[dim]{HELP}[/]")
    last: dict = {}  # what /stats says about the last reply
    while True:
        try:
            text = reader.read()
        except KeyboardInterrupt:
            err.print("\n[dim](Ctrl-D or /exit quits)[/]")
            continue
        if text is None:
            break
        command = text.strip()
        if not command:
            continue
        if command.startswith("//"):
            text = text.lstrip()[1:]
        elif command.startswith("/"):
            name, _, argument = command.partition(" ")
            if name in ("/exit", "/quit", "/bye"):
                break
            if name == "/reset":
                session.reset()
                last = {}
                err.print("[dim]conversation cleared[/]")
                continue
            if name == "/stats":
                show_stats(session, policy, last)
                continue
            if name in ("/save", "/load"):
                save_or_load(session, name, argument.strip(), session_file)
                continue
            if name in ("/help", "/?"):
                err.print("\n".join(f"  {c:<12} {what}" for c, what in COMMANDS.items()))
                continue
            if name == "/file":
                if not argument.strip():
                    err.print("[red]/file needs a path: /file notes.txt[/]")
                    continue
                try:
                    text = read_text_file(Path(argument.strip()).expanduser(), "/file")
                except LeankError as e:
                    err.print(f"[red]{e}[/]")
                    continue
                if not text.strip():
                    err.print(f"[red]/file {argument.strip()}: the file is empty[/]")
                    continue
            else:
                err.print(f"[red]unknown command {name}[/]; the commands are {', '.join(c.split()[0] for c in COMMANDS)} "
                          "(start the line with // to send it as text)")
                continue
        try:
            last = reply(session, text, options, json_lines)
            if session_file is not None:
                session.save(session_file, what="--session")
        except LeankError as e:
            if not interactive:
                raise
            err.print(f"[red]{e}[/]")


def save_or_load(session, name: str, argument: str, session_file: Optional[Path]) -> None:
    """/save [FILE] and /load FILE: a failure is one red line, and the conversation stays as it was."""
    path = Path(argument).expanduser() if argument else session_file
    try:
        if path is None:
            raise LeankError(f"{name} needs a file: {name} chat.session (or start chat with --session FILE)")
        if name == "/save":
            # a new name is never written over; the --session file is this conversation's own
            size = session.save(path, force=path == session_file, what="/save")
            err.print(f"[dim]saved {path} ({human_bytes(size)}, {session.cache.seq_len} tokens)[/]")
        else:
            session.load(path)
            err.print(f"[dim]loaded {path}: {len(session.messages)} messages, {session.cache.seq_len} tokens[/]")
    except LeankError as e:
        err.print(f"[red]{e}[/]")


def reply(session, text: str, options: dict, json_lines: bool) -> dict:
    """Stream one assistant reply to standard output; returns what /stats should say about it."""
    pieces: list[str] = []
    tokens = 0
    t0 = time.perf_counter()
    interrupted = hard = False
    with StopOnCtrlC() as ctrl_c:
        steps = session.send(text, **options)
        try:
            for step in steps:
                if step.token is not None:
                    tokens += 1
                if step.text:
                    pieces.append(step.text)
                    if not json_lines:
                        sys.stdout.write(step.text)
                        sys.stdout.flush()
                if ctrl_c.pressed:
                    interrupted = True
                    break
        except KeyboardInterrupt:  # the second Ctrl-C, maybe inside a forward pass
            interrupted = hard = True
        finally:
            steps.close()  # the session settles the cache and keeps the partial reply
    seconds = time.perf_counter() - t0
    if json_lines:
        stats = session.last_stats.as_dict() if session.last_stats and not interrupted else {}
        record = {"user": text, "assistant": "".join(pieces), **stats}
        if interrupted:
            record.update(generated_tokens=tokens, finish_reason="interrupted")
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if interrupted:
        err.print("[dim](reply stopped; the partial reply stays in the conversation"
                  + ("; its cache is rebuilt with the next message)" if hard else ")") + "[/]")
        return {"interrupted": True, "tokens": tokens, "seconds": seconds}
    return {"stats": session.last_stats}


def show_stats(session, policy, last: dict) -> None:
    s = last.get("stats")
    if s is not None:
        err.print(f"last reply: {s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s; "
                  f"prompt {s.prompt_tokens} tokens at {s.prefill_tokens_per_second:.1f} tok/s")
    elif last.get("interrupted"):
        err.print(f"last reply: stopped by Ctrl-C after {last['tokens']} tokens in {last['seconds']:.1f} s")
    else:
        err.print("no reply yet")
    err.print(cache_summary(policy, session.cache.nbytes().as_dict()))
