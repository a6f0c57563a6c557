"""Long sessions (issue 7): decode tens of thousands of tokens through a compressed cache and check that memory
grows exactly as `cache.nbytes()` says, and that reaching the model's context ends with a clear message.

    nice -n 10 python bench/soak.py                                  # 20K tokens on a tiny 32K-context model,
                                                                     # 4K on SmolLM2, then the context limit
    nice -n 10 python bench/soak.py --tokens 2000 --default-tokens 0 --json-out /tmp/soak.json

Phase "long": a random-weight llama (2 layers, 4 KV heads of 64, context 32768) decodes --tokens tokens one at a
time under leank+kivi (freq mask 0.5, K and V 4-bit, sink 128, recent 768, block 32): hundreds of block
moves. Every --every tokens: RSS, `cache.nbytes()` and `planned_nbytes()` (the same figure computed without
tensors; they must agree exactly). The RSS slope (least squares over the samples after the first block
move) is compared with the predicted bytes per token, and RSS minus the cache's bytes must stay flat: a
leak would show as a slope there. RoPE tables are extended to the whole context first so that their
doubling does not show up as cache growth.
Phase "default": the same on SmolLM2-135M (context 8192) for --default-tokens tokens.
Phase "limit": a model with a 512-token context is driven to its limit through the library (finish reason
"context"), `leank generate` (exit 0, finish "context") and a piped `leank chat` (one error line, exit 1).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def soak(model_path, tokens: int, every: int, policy_options: dict, label: str) -> dict:
    import torch

    import leank
    from leank.runtime.cache.plan import planned_nbytes
    from leank.masks.choose import build_policy

    m = leank.load(model_path, device="cpu")
    a = m.args
    policy = build_policy(m, **policy_options)
    if tokens + 64 > a.context_length:
        raise SystemExit(f"{label}: {tokens} tokens do not fit the context of {a.context_length}")
    m.transformer.rope.tables(0, a.context_length)  # RoPE tables at full size now, not doubling mid-run
    prompt = m.tokenize("Once upon a time, in a land far away, there lived a storyteller who never stopped. " * 3)[:64]
    cache = m.new_cache(policy=policy)
    gen = torch.Generator().manual_seed(0)
    samples = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = m.transformer(torch.tensor([prompt]), cache)[0, -1]
        for i in range(tokens):
            probs = torch.softmax(logits.float() / 0.8, -1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
            logits = m.transformer(torch.tensor([[tok]]), cache)[0, -1]
            if (i + 1) % every == 0 or i + 1 == tokens:
                gc.collect()
                n = cache.seq_len
                b = cache.nbytes()
                planned = planned_nbytes(policy, a, n, full_bytes_per_element=4)
                if b.total != planned.total:
                    raise AssertionError(f"{label}: nbytes() {b.total} != planned {planned.total} at {n} tokens")
                samples.append({"tokens": n, "rss": rss_bytes(), "cache_bytes": b.total, "allocated": b.allocated,
                                "middle_tokens": b.extra["middle_tokens"], "seconds": time.perf_counter() - t0})
    seconds = time.perf_counter() - t0
    first_move = policy.sink_tokens + policy.recent_tokens + policy.block_tokens
    steady = [s for s in samples if s["tokens"] > first_move + every]
    xs = [s["tokens"] for s in steady]
    _, rss_slope = fit(xs, [s["rss"] for s in steady])
    _, cache_slope = fit(xs, [s["cache_bytes"] for s in steady])
    _, leak_slope = fit(xs, [s["rss"] - s["cache_bytes"] for s in steady])
    n0, n1 = steady[0]["tokens"], steady[-1]["tokens"]
    predicted = (planned_nbytes(policy, a, n1, full_bytes_per_element=4).total
                 - planned_nbytes(policy, a, n0, full_bytes_per_element=4).total) / (n1 - n0)
    rest = [s["rss"] - s["cache_bytes"] for s in steady]
    return {
        "label": label, "model": str(model_path), "policy": policy.describe(), "tokens": tokens,
        "final_context": samples[-1]["tokens"], "block_moves": samples[-1]["middle_tokens"] // policy.block_tokens,
        "seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1),
        "predicted_bytes_per_token": round(predicted, 1), "nbytes_slope": round(cache_slope, 1),
        "rss_slope": round(rss_slope, 1), "rss_slope_over_predicted": round(rss_slope / predicted, 3),
        "rss_minus_cache_slope": round(leak_slope, 2), "rss_minus_cache_range_mib": round((max(rest) - min(rest)) / 2**20, 2),
        "rss_start_mib": round(steady[0]["rss"] / 2**20, 1), "rss_end_mib": round(steady[-1]["rss"] / 2**20, 1),
        "cache_end_mib": round(steady[-1]["cache_bytes"] / 2**20, 2), "samples": samples,
    }


def context_limit(workdir: Path) -> dict:
    """A 512-token model driven to its limit three ways; every way ends cleanly."""
    import leank
    from leank.convert.synthetic import TinySpec, write_tiny_model

    path = write_tiny_model(workdir / "ctx512.gguf", TinySpec(context_length=512, vocab_size=4096, dim=128, n_heads=2,
                                                              n_kv_heads=1))
    m = leank.load(path, device="cpu")
    policy = dict(kv="leank+kivi", k_bits=4, v_bits=4, sink_tokens=4, recent_tokens=64)
    from leank.masks.choose import build_policy

    cache = m.new_cache(policy=build_policy(m, **policy))
    last = list(m.stream(m.tokenize("hello there"), max_tokens=10_000, temperature=0.8, seed=1, cache=cache))[-1]
    out = {"library": {"finish_reason": last.finish_reason, "cache_tokens": cache.seq_len,
                       "generated": last.stats.generated_tokens}}
    env = dict(os.environ, COLUMNS="200")
    cli = [sys.executable, "-m", "leank.cli"]
    r = subprocess.run(cli + ["generate", str(path), "-p", "hello", "-n", "10000", "--json", "--kv", "leank+kivi",
                              "--k-bits", "4", "--v-bits", "4", "--sink", "4", "--recent", "64"],
                       capture_output=True, text=True, timeout=600, env=env)
    g = json.loads(r.stdout) if r.returncode == 0 else {}
    out["generate"] = {"exit": r.returncode, "finish_reason": g.get("finish_reason"),
                       "cache_tokens": g.get("cache", {}).get("tokens"), "stderr": r.stderr.strip()[-300:]}
    r = subprocess.run(cli + ["chat", str(path), "-n", "10000", "--seed", "1", "--kv", "leank+kivi", "--sink", "4",
                              "--recent", "64"], input="tell me everything\n" * 6, capture_output=True, text=True,
                       timeout=600, env=env)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    out["chat"] = {"exit": r.returncode, "reply_bytes": len(r.stdout),
                   "stderr_lines": len(lines), "last_line": lines[-1] if lines else "",
                   "traceback": "Traceback" in r.stderr}
    return out


def main() -> None:
    # glibc raises its mmap threshold as large blocks are freed, after which freed cache buffers stay in the
    # heap and RSS only shows the high-water mark; a fixed threshold returns them at once, so RSS follows
    # the live bytes. Set before the process starts: re-execute with it.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--default-tokens", type=int, default=4_000, help="0 skips SmolLM2")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()

    import torch

    from leank.convert.synthetic import TinySpec, write_tiny_model

    torch.set_num_threads(1)  # a shared 2-core machine: two threads spin against other work
    policy = dict(kv="leank+kivi", mask="freq:0.5", k_bits=4, v_bits=4, sink_tokens=128, recent_tokens=768)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tiny = write_tiny_model(work / "long.gguf", TinySpec(n_layers=2, dim=256, n_heads=4, n_kv_heads=4, head_dim=64,
                                                             ffn_dim=512, context_length=32768, vocab_size=4096))
        runs = [(tiny, a.tokens, "tiny 32K-context llama")]
        if a.default_tokens:
            runs.append((None, a.default_tokens, "SmolLM2-135M-Instruct Q4_1"))
        for path, n, label in runs:
            r = soak(path, n, a.every, policy, label)
            report["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
        report["context_limit"] = context_limit(work)
        print(json.dumps(report["context_limit"], indent=2), flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
