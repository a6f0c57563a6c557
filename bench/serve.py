"""`leank serve` on this machine (issue 15): a real server process on 127.0.0.1, driven over HTTP.

    nice -n 10 python bench/serve.py                      # SmolLM2, --kv leank+kivi, 4 slots
    nice -n 10 python bench/serve.py --kv dense --json-out /tmp/serve.json

1. streams: aggregate generated tokens/s of 1, then 4 concurrent requests (greedy, ignore_eos, --tokens
   each; distinct prompts so no prefix is shared); the target is 4 streams >= 2x one stream.
2. turns: one conversation of --turns turns, each request resending the whole history (as chat front ends
   do); time to first streamed token per turn, measured by the client. Target: turn 20 within 1.2x of turn 1.
3. restore: a --session-tokens prompt prefilled in a slot (its prompt_ms), saved to --slot-save-path,
   erased and restored (restore_ms from the server; the client's round trip too); the file's size against the
   cache's `nbytes()` plus 8 bytes per token id. Target: restore >= 20x faster than the prefill, size within 5 %.
4. soak (--soak N): N mixed requests from 4 threads (chat and text completions, streamed and not, clients that
   hang up mid-stream, malformed bodies); the server's RSS before and after, every slot idle at the end.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body=None, timeout=3600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, None if body is None else json.dumps(body).encode())
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data}")
    return data


def first_token_seconds(port: int, body: dict) -> tuple[float, str, dict]:
    """Stream a chat completion; (seconds until the first content piece, the whole reply, its usage)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode())
    r = conn.getresponse()
    first, pieces, usage = None, [], {}
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            text = c.get("delta", {}).get("content")
            if text:
                first = first or time.perf_counter() - t0
                pieces.append(text)
    conn.close()
    return first or 0.0, "".join(pieces), usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="leank+kivi")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per stream")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--session-tokens", type=int, default=6000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--soak", type=int, default=0, help="mixed requests for the memory soak (0: skip)")
    ap.add_argument("--skip", default="", help="phases to leave out, comma-separated: streams,turns,restore")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    port = free_port()
    slots = Path(tempfile.mkdtemp(prefix="leank-bench-slots-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "leank.cli"] + (["--threads", str(args.threads)] if args.threads else []) + [
        "serve", "--port", str(port), "--parallel", str(args.parallel), "--kv", args.kv, "--slot-save-path", str(slots)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load_before": os.getloadavg(), "kv": args.kv, "parallel": args.parallel,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        for _ in range(600):
            try:
                call(port, "GET", "/health")
                break
            except OSError:
                time.sleep(0.5)
        model = call(port, "GET", "/v1/models")["data"][0]
        out["model"], out["kv_cache"] = model["id"], model["meta"]["kv_cache"]

        skip = set(args.skip.split(","))
        # 1. one stream, then four at once
        def stream(i: int, results: list) -> None:
            body = {"messages": [{"role": "user", "content": f"Story number {i}: tell me about place {i * 7919}."}],
                    "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
            results.append(call(port, "POST", "/v1/chat/completions", body)["usage"]["completion_tokens"])

        call(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
        for n in () if "streams" in skip else (1, args.parallel):
            results: list = []
            t0 = time.perf_counter()
            threads = [threading.Thread(target=stream, args=(100 * n + i, results)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            out[f"streams_{n}"] = {"tokens": sum(results), "seconds": round(wall, 2),
                                   "tokens_per_second": round(sum(results) / wall, 2)}
            print(f"{n} stream(s): {sum(results)} tokens in {wall:.1f} s = {sum(results) / wall:.1f} tok/s", flush=True)
        if "streams" not in skip:
            out["streams_speedup"] = round(out[f"streams_{args.parallel}"]["tokens_per_second"]
                                           / out["streams_1"]["tokens_per_second"], 2)

        # 2. a conversation that resends its history every turn
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        ttft, reused = [], []
        for turn in range(0 if "turns" in skip else args.turns):
            messages.append({"role": "user", "content": f"Turn {turn + 1}: say one more thing about lighthouses."})
            seconds, reply, usage = first_token_seconds(port, {"messages": messages, "max_tokens": 32, "temperature": 0,
                                                               "id_slot": 0})
            messages.append({"role": "assistant", "content": reply})
            ttft.append(round(seconds, 3))
            reused.append([usage.get("prompt_tokens"), (usage.get("prompt_tokens_details") or {}).get("cached_tokens")])
        if ttft:
            out["turns_ttft_seconds"] = ttft
            out["turns_prompt_and_cached_tokens"] = reused
            out["turn_last_vs_first"] = round(ttft[-1] / ttft[0], 2) if ttft[0] else None
            print(f"time to first token, turn 1: {ttft[0]:.3f} s, turn {args.turns}: {ttft[-1]:.3f} s", flush=True)
        if "restore" not in skip:
            restore_phase(port, args, out)
        if args.soak:
            soak(port, proc.pid, args.soak, out)

    finally:
        proc.terminate()
        proc.wait(30)
        out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


def restore_phase(port: int, args, out: dict) -> None:
    """3. a long session: prefill, save, erase, restore."""
    done = call(port, "POST", "/v1/completions",
                {"prompt": list(range(1000, 1000 + args.session_tokens)), "max_tokens": 1, "id_slot": 1})
    prefill_ms = done["timings"]["prompt_ms"]
    slot_info = call(port, "GET", "/slots")[1]
    saved = call(port, "POST", "/slots/1?action=save", {"filename": "long.session"})
    call(port, "POST", "/slots/1?action=erase")
    t0 = time.perf_counter()
    restored = call(port, "POST", "/slots/1?action=restore", {"filename": "long.session"})
    round_trip = time.perf_counter() - t0
    expected = slot_info["cache_bytes"] + 8 * slot_info["n_tokens"]
    out["session"] = {"tokens": slot_info["n_tokens"], "prefill_ms": round(prefill_ms, 1),
                      "restore_ms": round(restored["timings"]["restore_ms"], 1),
                      "restore_round_trip_ms": round(1000 * round_trip, 1),
                      "speedup": round(prefill_ms / restored["timings"]["restore_ms"], 1),
                      "file_bytes": saved["n_written"], "cache_nbytes_plus_ids": expected,
                      "size_over": round(saved["n_written"] / expected - 1, 4)}
    print(f"session of {slot_info['n_tokens']} tokens: prefill {prefill_ms:.0f} ms, restore "
          f"{restored['timings']['restore_ms']:.0f} ms; file {saved['n_written']} B vs {expected} B", flush=True)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def soak(port: int, pid: int, n: int, out: dict) -> None:
    """4. n mixed requests; the server's RSS before and after."""
    def raw(method, path, data: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request(method, path, data)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status

    def hang_up(body: dict):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True, "max_tokens": 200}).encode())
        conn.getresponse().fp.readline()
        conn.sock.close()
        conn.close()

    statuses: dict = {}

    def one(i: int):
        body = {"messages": [{"role": "user", "content": f"Request {i}: one word please."}], "max_tokens": 4}
        kind = i % 6
        if kind == 0:
            s = raw("POST", "/v1/chat/completions", json.dumps(body).encode())
        elif kind == 1:
            s = raw("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}).encode())
        elif kind == 2:
            s = raw("POST", "/v1/completions", json.dumps({"prompt": f"Number {i} is", "max_tokens": 4}).encode())
        elif kind == 3:
            hang_up(body)
            s = "hung up"
        elif kind == 4:
            s = raw("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]')
        else:
            s = raw("POST", "/v1/chat/completions", json.dumps({**body, "max_tokens": -1}).encode())
        statuses[s] = statuses.get(s, 0) + 1

    def worker(lo: int, hi: int, k: int):
        for i in range(lo + k, hi, 4):
            one(i)

    def settle() -> float:
        for _ in range(100):
            if call(port, "GET", "/health")["slots_processing"] == 0:
                break
            time.sleep(0.2)
        return round(rss_mib(pid), 1)

    threads = [threading.Thread(target=worker, args=(0, 24, k)) for k in range(4)]  # every kind in every slot
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    readings = [settle()]
    t0 = time.perf_counter()
    rounds = 3
    for r in range(rounds):  # RSS after each third: growth that goes on round after round would be a leak
        lo, hi = 24 + r * n // rounds, 24 + (r + 1) * n // rounds
        threads = [threading.Thread(target=worker, args=(lo, hi, k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        readings.append(settle())
    seconds = time.perf_counter() - t0
    out["soak"] = {"requests": n, "seconds": round(seconds, 1), "statuses": {str(k): v for k, v in statuses.items()},
                   "rss_mib": readings, "slots_processing_after": call(port, "GET", "/health")["slots_processing"]}
    print(f"soak: {n} requests in {seconds:.0f} s, RSS MiB after warm-up and each third {readings}, "
          f"statuses {statuses}", flush=True)


if __name__ == "__main__":
    main()
