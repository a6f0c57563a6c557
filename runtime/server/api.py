"""The OpenAI-compatible HTTP API of `leank serve`, as a Starlette (ASGI) app over `slots.Engine`.

    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, top_k, seed, stop, stream
                                (llama-server's id_slot and ignore_eos too)
    POST /v1/completions        prompt (text or token ids), same options
    GET  /v1/models, GET /health, GET /slots
    POST /slots/{id}?action=save|restore|erase   {"filename": "name"} inside --slot-save-path

Every bad request is a 4xx with an OpenAI-style body, {"error": {"message", "type", "param", "code"}};
nothing a client sends reaches a traceback. Usage carries `prompt_tokens_details.cached_tokens` (the
prefix reused from the slot's cache) and `timings` (llama-server's names) shows where the time went.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from leank.errors import LeankError
from leank.runtime import defaults
from leank.runtime.generate import SamplingParams
from leank.runtime.server.slots import Engine, Job, SlotBusy

MAX_BODY_BYTES = 8 << 20
MAX_STOPS = 16
SLOT_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# --- reading requests ---------------------------------------------------------------------------------------
async def read_json(request: Request) -> dict:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        data = json.loads(bytes(body))
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None
    except ValueError as e:  # invalid JSON or UTF-8
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds a string that is not valid Unicode (a lone surrogate)") from None
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    return data


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def parse_options(body: dict, default_max: int) -> dict:
    """max_tokens, sampling and stop strings of a completion request (unknown fields are ignored)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, 1, 2**62, integer=True)
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    sampling = SamplingParams(
        temperature=float(_number(body, "temperature", defaults.TEMPERATURE, 0.0, 100.0)),
        top_k=int(_number(body, "top_k", defaults.TOP_K, 0, 2**31, integer=True)),
        top_p=float(_number(body, "top_p", defaults.TOP_P, 0.0, 1.0)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
    )
    if sampling.seed is not None and sampling.seed < 0:
        sampling.seed %= 2**63
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stops = list(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # llama-server's: fixed-length replies for benchmarks
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    slot = body.get("id_slot")
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
        raise ApiError(400, "'id_slot' must be an integer", "id_slot")
    return {"max_tokens": max_tokens, "sampling": sampling, "stop": stops, "stream": stream,
            "include_usage": bool(opts.get("include_usage")), "ignore_eos": ignore_eos,
            "id_slot": None if slot is None or slot < 0 else slot}


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' string", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}", "messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


# --- the app --------------------------------------------------------------------------------------------------
class Server:
    """The routes' state: the engine, the model's name, the key and the slot folder."""

    def __init__(self, model, policy, *, parallel: int = 1, context: int | None = None, api_key: str | None = None,
                 slot_save_path: str | Path | None = None, model_name: str | None = None, memory: int | None = None):
        self.model = model
        self.engine = Engine(model, policy, parallel=parallel, context=context, memory=memory)
        if memory is not None and self.engine.room() <= 0:
            raise LeankError(f"the weights ({self.engine.weights_bytes} bytes) and the working set "
                             f"({self.engine.working_bytes} bytes) alone are over the memory budget of {memory} bytes")
        self.context = self.engine.context
        self.api_key = api_key
        self.slot_dir = None if slot_save_path is None else Path(slot_save_path).resolve()
        self.name = model_name or model.path.name
        self.policy = policy
        self.created = int(time.time())

    # --- helpers ------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", kind="authentication_error")

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context is {self.context} tokens "
                                "(it must leave room for at least one generated token)",
                           "messages", code="context_length_exceeded")

    def job(self, ids: list[int], opts: dict) -> Job:
        if opts["id_slot"] is not None and opts["id_slot"] >= len(self.engine.slots):
            raise ApiError(400, f"id_slot {opts['id_slot']} does not exist (slots 0-{len(self.engine.slots) - 1})",
                           "id_slot")
        loop = asyncio.get_running_loop()
        job = Job(ids, min(opts["max_tokens"], self.context - len(ids)), opts["sampling"], opts["stop"], loop,
                  asyncio.Queue(), slot_id=opts["id_slot"], ignore_eos=opts["ignore_eos"])
        e = self.engine
        if e.memory is not None:
            need, room = e.request_nbytes(job), e.room()
            if need > room:
                raise ApiError(503, f"this request's cache could reach {need} bytes ({len(ids)} prompt tokens + "
                                    f"{job.max_tokens} max_tokens); the memory budget of {e.memory} bytes leaves "
                                    f"{room} after the weights ({e.weights_bytes}) and the working set "
                                    f"({e.working_bytes}): ask for fewer max_tokens",
                               "max_tokens", code="over_memory_budget", kind="server_error")
        return job

    @staticmethod
    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}

    async def events(self, job: Job, request: Request):
        """The job's events as they come; the slot is freed if the client goes away or this is cancelled."""
        self.engine.submit(job)
        finished = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "error":
                    finished = True
                    raise ApiError(500, f"internal error: {value}", kind="server_error")
                yield kind, value
                if kind == "done":
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.cancel(job)

    async def complete(self, request: Request, ids: list[int], opts: dict, chat: bool):
        job = self.job(ids, opts)
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if not opts["stream"]:
            pieces, done = [], None
            async for kind, value in self.events(job, request):
                if kind == "text":
                    pieces.append(value)
                else:
                    done = value
            if done is None:  # the client went away
                return error_response(499, "client closed the request", code="client_closed")
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text, "logprobs": None})
            choice["finish_reason"] = done["finish_reason"]
            return JSONResponse({"id": cid, "object": obj, "created": int(time.time()), "model": self.name,
                                 "choices": [choice], "usage": self.usage(done), "timings": done["timings"],
                                 "id_slot": done["id_slot"]})

        created = int(time.time())
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str | None, finish=None, **extra) -> str:
            if chat:
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]
            body = {"id": cid, "object": chunk_obj, "created": created, "model": self.name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                async for kind, value in self.events(job, request):
                    if kind == "text":
                        yield chunk({"content": value} if chat else value)
                    else:
                        yield chunk({} if chat else "", value["finish_reason"], timings=value["timings"])
                        if opts["include_usage"]:
                            yield chunk(None, usage=self.usage(value))
                        yield "data: [DONE]\n\n"
            except ApiError as e:
                err = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
                yield f"data: {json.dumps(err)}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- routes --------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        self.check_key(request)
        body = await read_json(request)
        messages = parse_messages(body)
        opts = parse_options(body, self.context)
        try:
            ids = self.model.chat_tokens(messages)
        except LeankError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        self.check_prompt(ids)
        return await self.complete(request, ids, opts, chat=True)

    async def completions(self, request: Request):
        self.check_key(request)
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.model.tokenize(prompt)
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            vocab = self.model.args.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
        opts = parse_options(body, 16)
        self.check_prompt(ids)
        return await self.complete(request, ids, opts, chat=False)

    async def models(self, request: Request):
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.name, "object": "model", "created": self.created, "owned_by": "leank",
            "meta": {"context": self.context, "parallel": len(self.engine.slots), "kv_cache": self.policy_text()}}]})

    def policy_text(self) -> str:
        return "dense" if self.policy is None else self.policy.describe()

    async def health(self, request: Request):
        idle = self.engine.idle()
        return JSONResponse({"status": "ok", "slots_idle": idle, "slots_processing": len(self.engine.slots) - idle})

    async def slots(self, request: Request):
        self.check_key(request)
        return JSONResponse([s.info() for s in self.engine.slots])

    async def slot_action(self, request: Request):
        self.check_key(request)
        raw = request.path_params["slot_id"]
        if not raw.isascii() or not raw.isdigit() or int(raw) >= len(self.engine.slots):
            raise ApiError(400, f"no slot {raw[:20]!r} (slots 0-{len(self.engine.slots) - 1})", "id_slot")
        slot_id, action = int(raw), request.query_params.get("action")
        if action not in ("save", "restore", "erase"):
            raise ApiError(400, "action must be save, restore or erase", "action")
        try:
            if action == "erase":
                return JSONResponse(await asyncio.to_thread(self.engine.slot_erase, slot_id))
            if self.slot_dir is None:
                raise ApiError(400, "this server has no --slot-save-path: slots cannot be saved or restored",
                               code="not_supported")
            body = await read_json(request)
            name = body.get("filename")
            if not isinstance(name, str) or not SLOT_FILE.fullmatch(name):
                raise ApiError(400, "'filename' must be a plain file name (letters, digits, '.', '_', '-'; "
                                    "no folders, not starting with '.')", "filename")
            path = self.slot_dir / name
            if path.resolve().parent != self.slot_dir:  # a symbolic link out of the folder
                raise ApiError(400, "'filename' must stay inside --slot-save-path", "filename")
            if action == "save":
                out = await asyncio.to_thread(self.engine.slot_save, slot_id, path)
            else:
                if not path.is_file():
                    raise ApiError(404, f"no slot file {name!r}", "filename", code="not_found")
                out = await asyncio.to_thread(self.engine.slot_restore, slot_id, path)
            return JSONResponse({**out, "filename": name})
        except SlotBusy as e:
            raise ApiError(409, str(e), "id_slot", code="slot_busy") from None
        except LeankError as e:
            raise ApiError(400, str(e).replace(str(self.slot_dir) + "/", ""), "filename") from None


def make_app(model, policy, **options) -> Starlette:
    """The ASGI app for `model` and a cache `policy` (options: `Server`'s). Starts its decode thread on startup."""
    server = Server(model, policy, **options)

    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    async def http_error(request, exc):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    async def any_error(request, exc):  # a bug of ours: say so, without a traceback
        return error_response(500, f"internal error ({type(exc).__name__})", kind="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/slots", server.slots, methods=["GET"]),
        Route("/slots/{slot_id}", server.slot_action, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: any_error})
    app.state.server = server
    return app
