"""Decode speed and peak memory on CPU: leank (dense and compressed caches) against llama.cpp.

    python bench/decode_cpu.py                      # SmolLM2 default model, contexts 512 and 4096
    python bench/decode_cpu.py --ctx 512 --ctx 4096 --tokens 64 --threads 2 --json-out bench/out/decode_cpu.json

Each measurement runs in its own process (so peak RSS is that engine's alone): prefill a context of N
tokens of prose, then greedy-decode --tokens tokens, timing only the decode. Same file, same thread
count for both engines. On a shared VM speed drifts by tens of percent from minute to minute, so
`--repeat R` runs every engine R times, interleaved round by round; the table gives the median tok/s
and the median over rounds of each round's ratio (engines measured minutes apart are never compared).
Prints a table; append it to bench/RESULTS.md yourself, with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROSE = HERE.parent / "tests" / "data" / "prose.txt"
POLICIES = {
    "dense": {},
    "leank": dict(kv="leank"),  # the default compressed cache (`--kv leank`)
    "kivi4": dict(kv="kivi", k_bits=4, v_bits=4),
    "leank0.7+kivi2": dict(kv="leank+kivi", ratio=0.7, k_bits=2, v_bits=2),
}
# the dense cache with LEANK_GGML_PROGRAM=0 (--per-product): one ggml graph per product, as before the program
PER_PRODUCT = "dense/per-product"
# llama.cpp caches: name -> (type_k = type_v GGML id, flash attention); a quantized V needs flash attention
LLAMA_CACHES = {"f16": (1, False), "q8_0": (8, True), "q4_0": (2, True)}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def context_ids(tokenize, n: int) -> list[int]:
    text = PROSE.read_text()
    ids: list[int] = []
    while len(ids) < n:
        ids = tokenize(text)
        text += "\n\n" + PROSE.read_text()
    return ids[:n]


def worker_leank(model_path: str | None, ctx: int, tokens: int, policy_name: str) -> dict:
    import leank  # before torch: it sets OpenMP's wait policy, read when torch loads libgomp
    import torch
    from leank.masks.choose import build_policy

    m = leank.load(model_path, device="cpu")
    policy = build_policy(m, **POLICIES["dense" if policy_name == PER_PRODUCT else policy_name])
    ids = context_ids(m.tokenize, ctx)
    cache = m.new_cache(policy=policy)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = m.transformer(torch.tensor([ids]), cache)[0, -1]
        prefill = time.perf_counter() - t0
        token = int(logits.argmax())
        t1 = time.perf_counter()
        for _ in range(tokens):
            logits = m.transformer(torch.tensor([[token]]), cache)[0, -1]
            token = int(logits.argmax())
        decode = time.perf_counter() - t1
    b = cache.nbytes()
    return {"engine": "leank", "policy": policy_name, "ctx": ctx, "prefill_tok_s": ctx / prefill,
            "decode_tok_s": tokens / decode, "peak_rss_mib": peak_rss_mib(), "cache_bytes": b.total,
            "cache_ratio_vs_fp16": b.ratio}


def turn_off_extra_bufts() -> None:
    """llama.cpp without its extra buffer types (AMX, weight repacking): Llama() has no argument for it, so
    the default model parameters it starts from are changed for this process."""
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def without_extra_bufts():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = without_extra_bufts


def worker_llama_cpp(model_path: str, ctx: int, tokens: int, threads: int, cache: str, extra_bufts: bool) -> dict:
    import llama_cpp
    import numpy as np

    if not extra_bufts:
        turn_off_extra_bufts()
    type_kv, flash = LLAMA_CACHES[cache]
    llm = llama_cpp.Llama(model_path, n_ctx=ctx + tokens + 8, n_threads=threads, n_batch=512, verbose=False,
                          type_k=type_kv, type_v=type_kv, flash_attn=flash)

    def last_logits():  # without logits_all, llama-cpp-python keeps no scores: read the context's last row
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    ids = context_ids(lambda t: llm.tokenize(t.encode(), add_bos=True), ctx)
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    token = int(np.argmax(last_logits()))
    t1 = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
    decode = time.perf_counter() - t1
    return {"engine": "llama.cpp", "policy": f"{cache} cache", "ctx": ctx, "prefill_tok_s": ctx / prefill,
            "decode_tok_s": tokens / decode, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--ctx", type=int, action="append", help="context lengths (default 512 and 4096)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--policy", action="append", choices=list(POLICIES), help="leank cache policies")
    ap.add_argument("--llama-cache", action="append", choices=list(LLAMA_CACHES),
                    help="llama.cpp cache types (default f16; q8_0 and q4_0 run with flash attention)")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="llama.cpp without its extra buffer types (weight repacking, AMX): its AMX matrix "
                         "product segfaults on some VMs (this project's Xeon VM, 2026-12-02)")
    ap.add_argument("--per-product", action="store_true",
                    help="also leank dense with LEANK_GGML_PROGRAM=0 (a ggml graph per product, the path before "
                         "the decode-step program), in the same rounds")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; every engine runs once per round (default 1)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        engine, ctx, tokens, policy = a.worker
        import torch

        torch.set_num_threads(a.threads)
        if engine == "leank":
            out = worker_leank(a.model, int(ctx), int(tokens), policy)
        else:
            out = worker_llama_cpp(a.model, int(ctx), int(tokens), a.threads, policy, not a.no_extra_bufts)
        print(json.dumps(out))
        return
    if a.model is None:
        from leank.runtime.defaults import default_model_path

        a.model = str(default_model_path())
    rows = []
    for rnd in range(a.repeat):
        for ctx in a.ctx or [512, 4096]:
            jobs = [("llama.cpp", c) for c in (a.llama_cache or ["f16"])] + [("leank", p) for p in (a.policy or list(POLICIES))]
            if a.per_product:
                jobs.append(("leank", PER_PRODUCT))
            for engine, policy in jobs:
                cmd = [sys.executable, __file__, "--model", a.model, "--threads", str(a.threads),
                       "--worker", engine, str(ctx), str(a.tokens), policy] + (["--no-extra-bufts"] if a.no_extra_bufts else [])
                env = {**os.environ, "LEANK_GGML_PROGRAM": "0"} if policy == PER_PRODUCT else None
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    raise SystemExit(f"{engine} {policy} at {ctx} failed")
                row = json.loads(r.stdout.strip().splitlines()[-1])
                row["round"], row["load1"] = rnd, os.getloadavg()[0]
                rows.append(row)
                print(f"round {rnd} {row['engine']:>9} {row['policy']:>15} ctx {ctx:>5}: decode {row['decode_tok_s']:6.1f} tok/s, "
                      f"prefill {row['prefill_tok_s']:6.1f} tok/s, peak RSS {row['peak_rss_mib']:6.0f} MiB, load {row['load1']:.1f}", flush=True)
    print()
    print("| engine | cache | context | decode tok/s (median) | vs llama.cpp (median of rounds) | vs leank dense | prefill tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["engine"], r["policy"], r["ctx"]) for r in rows))

    def same_round(row, engine, policy):
        return next(r for r in rows if r["engine"] == engine and r["policy"] == policy and r["ctx"] == row["ctx"]
                    and r["round"] == row["round"])

    def ratio(mine, engine, policy):
        return statistics.median(r["decode_tok_s"] / same_round(r, engine, policy)["decode_tok_s"] for r in mine)

    for engine, policy, ctx in keys:
        mine = [r for r in rows if (r["engine"], r["policy"], r["ctx"]) == (engine, policy, ctx)]
        vs_dense = f"{ratio(mine, 'leank', 'dense'):.2f}x" if engine == "leank" and any(
            r["policy"] == "dense" for r in rows) else "-"
        print(f"| {engine} | {policy} | {ctx} | {statistics.median(r['decode_tok_s'] for r in mine):.1f} | "
              f"{ratio(mine, 'llama.cpp', 'f16 cache'):.2f}x | {vs_dense} | "
              f"{statistics.median(r['prefill_tok_s'] for r in mine):.0f} | {max(r['peak_rss_mib'] for r in mine):.0f} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": a.threads, "tokens": a.tokens, "rounds": a.repeat, "model": a.model,
            "llama_extra_bufts": not a.no_extra_bufts, "load_at_end": os.getloadavg()}
    print(f"\n{meta}")
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
