"""`leank serve` (issue 15) on a real server process on 127.0.0.1 with the real default model: the
official `openai` client, streaming and not; concurrent conversations against the library's greedy
output; prefix reuse in usage; slot save/restore over HTTP; bad requests are 4xx with an error object."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leank.masks.choose import build_policy
from leank.runtime.decode import prefill, step
from leank.runtime.server.slots import Engine

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
CTX = 1024
PARALLEL = 4  # the test server's slots
SMALL = ["--kv", "leank+kivi", "--sink", "32", "--recent", "64"]  # compression within a few hundred tokens
STORY = ("The lighthouse keeper wrote in his log every evening: the weather, the ships that passed, "
         "the birds that rested on the rail. ") * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The server and the library compare greedy replies token for token: both run this many threads, since
# the default follows the machine's load (cli.options.default_threads) and a prompt's BLAS sums differ
# in their last bits between thread counts, enough to turn a 135M model's greedy reply.
THREADS = max(1, min(2, os.cpu_count() or 1))


class ServerProcess:
    """`leank serve ARGS` on a free port, or `script` (Python source run with the port and thread count
    before ARGS) for a server made with the library."""

    def __init__(self, args: list[str], tmp: Path, script: str | None = None):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(tmp / f"server-{self.port}.log", "w+")
        command = (["-m", "leank.cli", "serve", "--port", str(self.port), "--threads", str(THREADS)] if script is None
                   else ["-c", script, str(self.port), str(THREADS)])
        self.proc = subprocess.Popen([sys.executable, *command, *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not come up")

    def request(self, method: str, path: str, body=None, headers=None, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0, timeout=300)

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while True:
            status, h = self.request("GET", "/health")
            if h["slots_processing"] == 0 or time.time() > deadline:
                return h
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def server(default_model_path, slot_dir, tmp_path_factory):
    s = ServerProcess(["--parallel", str(PARALLEL), "--ctx", str(CTX), "--api-key", KEY, "--slot-save-path", str(slot_dir),
                       *SMALL], tmp_path_factory.mktemp("server"))
    yield s
    s.close()


# Where the library's top two logits are closer than this, a reply fed another way (a prefix from a
# slot's cache, a batch of several rows) may take the other token: ggml quantizes activations to 8 bits,
# which turns the last-bit differences of another feeding into logit changes of up to ~0.3 on this
# 135M model. Up to the first such token the server must say exactly what the library says.
MARGIN = 0.6


@dataclass
class Reply:
    text: str  # the library's whole greedy reply
    sure: str  # its text up to the first token whose margin is under MARGIN (all of it when none is)
    sure_tokens: int
    prompt_tokens: int
    completion_tokens: int

    def matches(self, server_text: str) -> bool:
        """The server's reply says what the library is sure of, and all of it when the library is sure
        of every token."""
        if self.sure_tokens == self.completion_tokens:
            return server_text == self.text
        return server_text.startswith(self.sure)


@pytest.fixture(scope="module")
def library(default_model):
    """greedy(messages, max_tokens) -> the library's own greedy `Reply` under the server's policy."""
    m = default_model
    policy = build_policy(m, kv="leank+kivi", sink_tokens=32, recent_tokens=64)

    def greedy(messages, max_tokens) -> Reply:
        ids = m.chat_tokens(messages)
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            cache = m.new_cache(policy=policy)
            logits = prefill(m.transformer, cache, torch.tensor([ids], dtype=torch.long))[0]
            decoder, pieces, sure, sure_tokens, n = m.tokenizer.stream_decoder(), [], None, 0, 0
            while n < max_tokens:
                top = torch.topk(logits, 2)
                token = int(top.indices[0])
                if sure is None and float(top.values[0] - top.values[1]) < MARGIN:
                    sure, sure_tokens = "".join(pieces), n
                if token in m.tokenizer.eog_ids:
                    break
                n += 1
                pieces.append(decoder.push(token))
                if n < max_tokens:
                    logits = step(m.transformer, cache, torch.tensor([token]))[0]
            pieces.append(decoder.flush())
        finally:
            torch.set_num_threads(before)
        text = "".join(pieces)
        return Reply(text, text if sure is None else sure, n if sure is None else sure_tokens, len(ids), n)

    return greedy


def cached(usage) -> int:
    """The prompt tokens the server took from a slot's cache, from a reply's usage."""
    return usage.prompt_tokens_details.cached_tokens


def erase_slots(server) -> None:
    """Empty every slot: the next requests are prefilled from nothing, as the library's are."""
    for i in range(PARALLEL):
        assert server.request("POST", f"/slots/{i}?action=erase")[0] == 200


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]


def test_health_models_and_the_api_key(server):
    assert server.request("GET", "/health")[0] == 200
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"].endswith(".gguf")
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, body = server.request("GET", "/v1/models", headers=headers)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=chat("hi"), max_tokens=2)


def test_openai_client_streaming_and_not_match_the_library(server, library):
    messages = chat("Describe the lighthouse keeper's evening. " + STORY)
    want = library(messages, 24)
    assert want.sure_tokens >= 2  # the comparison means something for this prompt
    c = server.client()
    erase_slots(server)
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    assert cached(r.usage) == 0 and want.matches(r.choices[0].message.content)
    assert r.usage.prompt_tokens == want.prompt_tokens
    if want.sure_tokens == want.completion_tokens:
        assert r.usage.completion_tokens == want.completion_tokens
    pieces, usage = [], None
    for chunk in c.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert cached(usage) == want.prompt_tokens - 1  # the second time, all but the last prompt token is in a slot
    assert want.matches("".join(pieces))
    text = c.completions.create(model="m", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens <= 8


def test_four_concurrent_conversations_match_the_library(server, library):
    topics = ["rivers", "the moon", "bread", "winter"]
    convs = [chat(f"Tell me about {t}. " + STORY[: 80 * (i + 1)]) for i, t in enumerate(topics)]
    got: dict[int, str] = {}

    def run(i):
        r = server.client().chat.completions.create(model="m", messages=convs[i], max_tokens=20, temperature=0)
        got[i] = r.choices[0].message.content

    erase_slots(server)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wants = [library(convs[i], 20) for i in range(4)]
    assert sum(w.sure_tokens for w in wants) >= 8
    for i in range(4):
        assert wants[i].matches(got[i]), (topics[i], got[i], wants[i])


def test_a_resent_history_reuses_the_cached_prefix(server, library):
    c = server.client()
    messages = chat("Where do lighthouses stand? " + STORY)
    first = c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And why?"}]
    second = c.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert cached(second.usage) >= first.usage.prompt_tokens
    want = library(messages, 12)
    assert want.matches(second.choices[0].message.content), (second.choices[0].message.content, want)


def test_stop_strings_and_limits(server):
    """The same request with and without a stop string, each on an emptied slot 0 (so both compute the
    same numbers): the stopped reply is the full one up to the stop string."""
    c = server.client()
    messages = chat("Count from one to ten in words, separated by commas.")

    def on_a_fresh_slot(**kw):
        assert server.request("POST", "/slots/0?action=erase")[0] == 200
        r = c.chat.completions.create(model="m", messages=messages, extra_body={"id_slot": 0}, **{"temperature": 0, **kw})
        assert cached(r.usage) == 0
        return r

    full = on_a_fresh_slot(max_tokens=30).choices[0].message.content
    word = next((w for w in full.split(",")[1:] if w.strip()), full[3:6])
    r = on_a_fresh_slot(max_tokens=30, stop=[word])
    assert r.choices[0].message.content == full[: full.index(word)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=10**9, temperature=0, seed=1)
    assert r.usage.completion_tokens <= CTX  # a huge max_tokens is capped by the context
    r = on_a_fresh_slot(max_tokens=5, temperature=0.9, seed=7)
    r2 = on_a_fresh_slot(max_tokens=5, temperature=0.9, seed=7)
    assert r.choices[0].message.content == r2.choices[0].message.content and r.choices[0].finish_reason == "length"


BAD = [
    (b"{not json", 400), (b"\xff\xfe{}", 400), (b"[1, 2]", 400), (b"[" * 100000, 400),
    ({"messages": "hi"}, 400), ({"messages": []}, 400), ({"messages": [{"role": 1, "content": "x"}]}, 400),
    ({"messages": [{"role": "user", "content": 5}]}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "id_slot": 99}, 400),
]


@pytest.mark.parametrize("body,status", BAD)
def test_bad_requests_are_4xx_error_objects(server, body, status):
    got, reply = server.request("POST", "/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_more_bad_requests(server):
    status, reply = server.request("POST", "/v1/chat/completions", b"x" * (10 << 20))
    assert status == 413 and "error" in reply
    long = chat("word " * 2000)
    status, reply = server.request("POST", "/v1/chat/completions", {"messages": long})
    assert status == 400 and str(CTX) in reply["error"]["message"]
    n = int(reply["error"]["message"].split()[3])
    assert n > CTX and str(n) in reply["error"]["message"]  # names both numbers
    for path in ("/nowhere", "/v1/nothing"):
        status, reply = server.request("GET", path)
        assert status == 404 and "error" in reply
    status, reply = server.request("POST", "/v1/completions", {"prompt": [10**9]})
    assert status == 400
    status, reply = server.request("POST", "/v1/chat/completions",
                                   {"messages": chat("hi"), "max_tokens": 2, "frobnicate": {"x": 1}})
    assert status == 200  # unknown fields are ignored, as OpenAI clients send extras


def test_a_client_that_disconnects_frees_its_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"messages": chat("Write a long story."), "max_tokens": 500, "stream": True}).encode()
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    r.fp.readline()  # the first event
    conn.sock.close()
    conn.close()
    h = server.wait_idle(60)
    assert h["slots_processing"] == 0


def test_slots_save_restore_and_erase_over_http(server, slot_dir):
    c = server.client()
    messages = chat("Remember the keeper's log. " + STORY)
    first = c.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"id_slot": 2})
    assert first.model_extra["id_slot"] == 2
    status, saved = server.request("POST", "/slots/2?action=save", {"filename": "keeper.session"})
    assert status == 200 and saved["n_saved"] > first.usage.prompt_tokens and (slot_dir / "keeper.session").is_file()
    status, erased = server.request("POST", "/slots/2?action=erase")
    assert status == 200 and erased["n_erased"] == saved["n_saved"]
    status, restored = server.request("POST", "/slots/3?action=restore", {"filename": "keeper.session"})
    assert status == 200 and restored["n_restored"] == saved["n_saved"]
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "What did he write?"}]
    again = c.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"id_slot": 3})
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    for name in ("../escape", "/etc/passwd", ".hidden", "a/b", "", "x" * 300):
        status, reply = server.request("POST", "/slots/0?action=save", {"filename": name})
        assert status == 400 and reply["error"]["param"] == "filename"
    (slot_dir / "junk.session").write_bytes(b"not a session")
    status, reply = server.request("POST", "/slots/0?action=restore", {"filename": "junk.session"})
    assert status == 400 and str(slot_dir) not in reply["error"]["message"]
    assert server.request("POST", "/slots/0?action=restore", {"filename": "missing"})[0] == 404
    assert server.request("POST", "/slots/9?action=save", {"filename": "x"})[0] == 400
    assert server.request("POST", "/slots/0?action=explode", {"filename": "x"})[0] == 400
    assert not list(slot_dir.parent.glob("escape*"))


# --- fuzzing the endpoints ------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "x"]) | JSON,
                                                             "content": st.text(max_size=30) | JSON}), max_size=3) | JSON,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 50000), max_size=4) | JSON,
    "max_tokens": st.integers(-3, 4) | st.sampled_from([10**30, 0, None]) | JSON,
    "temperature": st.floats(allow_nan=True) | JSON, "top_p": st.floats() | JSON, "seed": st.integers() | JSON,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20) | JSON,
    "stream": st.booleans() | JSON, "id_slot": st.integers(-2, 5) | JSON,
})


@settings(derandomize=True, deadline=None, database=None, max_examples=120,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/slots/0?action=save",
                             "/slots/1?action=restore"]),
       body=FIELDS | JSON, raw=st.none() | st.binary(max_size=64))
def test_fuzzed_requests_never_500(server, path, body, raw):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
        body["max_tokens"] = 3  # keep each example quick: huge values are tested above
    if isinstance(body, dict) and "max_tokens" not in body:
        body["max_tokens"] = 2
    data = raw if raw is not None else json.dumps(body).encode()
    status, reply = server.request("POST", path, data)
    assert status < 500, reply
    if status >= 400:
        assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_after_everything_no_slot_is_left_busy(server):
    assert server.wait_idle(60)["slots_processing"] == 0
    status, slots = server.request("GET", "/slots")
    assert status == 200 and len(slots) == 4 and not any(s["is_processing"] for s in slots)


def test_a_dense_server_binds_to_localhost(default_model_path, tmp_path):
    s = ServerProcess(["--parallel", "2", "--kv", "dense"], tmp_path)
    try:
        with socket.socket() as probe:  # nothing listens on the machine's other addresses
            probe.settimeout(2)
            host = socket.gethostbyname(socket.gethostname())
            if not host.startswith("127."):
                assert probe.connect_ex((host, s.port)) != 0
        status, body = s.request("POST", "/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 3,
                                                                  "temperature": 0})
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        s.close()


def test_serve_refuses_bad_options_with_one_line(default_model_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args, words in ((["--slot-save-path", str(tmp_path / "nowhere")], "no such folder"),
                        (["--ctx", "100000"], "over the model's context")):
        r = subprocess.run([sys.executable, "-m", "leank.cli", "serve", "--port", str(free_port()), *args],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


# A library server with a memory budget below its slots' full caches (`leank serve --memory` refuses to
# start so: it plans for every slot at the whole context): requests wait for room, or are a 503.
BUDGET_SERVER = """
import sys, torch, uvicorn, leank
from leank.masks.choose import build_policy
from leank.runtime.server.api import make_app
port, threads, budget = map(int, sys.argv[1:])
torch.set_num_threads(threads)
m = leank.load(device="cpu")
app = make_app(m, build_policy(m, kv="dense"), parallel=2, memory=budget)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def test_memory_budget_admits_what_fits_and_refuses_what_never_can(default_model, default_model_path, tmp_path):
    engine = Engine(default_model, build_policy(default_model, kv="dense"), parallel=2, memory=1)
    per_token = default_model.args.kv_bytes_per_token(2)  # a dense cache on CPU holds float16
    budget = engine.weights_bytes + engine.working_bytes + 120 * per_token
    s = ServerProcess([str(budget)], tmp_path, script=BUDGET_SERVER)
    try:
        status, body = s.request("POST", "/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 500})
        assert status == 503 and body["error"]["code"] == "over_memory_budget"
        assert str(budget) in body["error"]["message"] and "500 max_tokens" in body["error"]["message"]
        got = {}

        def run(i):  # two requests of ~70 tokens each: only one fits at a time, the other waits its turn
            got[i] = s.request("POST", "/v1/chat/completions", {"messages": chat(f"Say {i}."), "max_tokens": 40,
                                                                "temperature": 0, "ignore_eos": True})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(got[i][0] == 200 and got[i][1]["usage"]["completion_tokens"] == 40 for i in range(2))
        assert s.wait_idle()["slots_processing"] == 0
    finally:
        s.close()
