"""`leank serve`: an OpenAI-compatible HTTP server (the app is `leank.runtime.server.api`).

A plain function, registered by `leank.cli.app` (it imports neither the app nor another command)."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.options import (CANDIDATES, DebugOpt, DeviceOpt, DtypeOpt, GroupOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg,
                               ModelOpt, RatioOpt, RecentOpt, SinkOpt, ThreadsOpt, VBitsOpt, load_model, memory_option,
                               model_path, parse_size, policy_within_memory)
from leank.cli.output import err
from leank.errors import LeankError
from leank.runtime.server.api import make_app
from leank.runtime.server.slots import PREFILL_CHUNK


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on. Anything but 127.0.0.1 exposes the "
                                      "model to the network: set --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="N",
                                      help="TCP port to listen on (0: any free one).")] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64, metavar="N",
                                          help="Conversations decoded together, each with its own cache.")] = 1,
    ctx: Annotated[Optional[int], typer.Option("--ctx-size", "-c", "--ctx", min=2, metavar="N", show_default=False,
                                               help="Tokens per conversation (default: the model's context).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="LEANK_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY'.", show_default=False)] = None,
    slot_save_path: Annotated[Optional[Path], typer.Option("--slot-save-path", metavar="DIR", help="Folder for POST /slots/{id}"
                                                           "?action=save|restore.", show_default=False)] = None,
    memory: Annotated[Optional[str], memory_option(
        "Memory budget (e.g. 8GiB, 512MiB, 2G) for the weights, --parallel KV caches at --ctx-size and the working "
        f"set. Without --kv: the least compressed cache ({CANDIDATES}) that fits; with --kv: that "
        "cache, refused if it cannot fit. Each request is admitted when its cache at prompt + max_tokens fits, "
        "else waits; one that can never fit is a 503.")] = None,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Serve MODEL over HTTP with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    import uvicorn  # the web server only when serving

    if slot_save_path is not None and not slot_save_path.is_dir():
        raise LeankError(f"--slot-save-path {slot_save_path}: "
                         f"{'no such folder' if not slot_save_path.exists() else 'not a folder'}")
    sock = listening_socket(host, port)  # before the model loads: a port in use is one line, at once
    port = sock.getsockname()[1]
    m = load_model(model_path(model, model_option), device, dtype, quiet=True)
    if ctx is not None and ctx > m.args.context_length:
        raise LeankError(f"--ctx {ctx} is over the model's context of {m.args.context_length}")
    policy = policy_within_memory(m, memory, ctx or m.args.context_length, kv, mask, ratio, k_bits, v_bits, group_size,
                                  sink, recent, parallel=parallel, prefill_rows=PREFILL_CHUNK)
    budget = None if memory is None else parse_size(memory)
    application = make_app(m, policy, parallel=parallel, context=ctx, api_key=api_key, slot_save_path=slot_save_path,
                           memory=budget)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/]")
    err.print(f"[bold]{m.path.name}[/] · KV cache: {policy.describe()} · {parallel} slot(s) · "
              f"listening on http://{host}:{port}/v1", highlight=False)
    uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="warning",
                                  access_log=False)).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` as uvicorn would bind it, or one line saying why it cannot be
    (an address in use, a host name that does not resolve, a port that needs root)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = e.strerror or str(e)
        raise LeankError(f"cannot listen on {host}:{port}: {why[0].lower() + why[1:]}") from None
    return sock

