"""Peak memory of a long prefill: dense cache against compressed caches (CPU).

    python bench/prefill_memory.py --tokens 8000

Each policy runs in its own process: load the model, note the resident memory, prefill --tokens tokens
of prose, note the peak. A compressed prefill compresses every layer's K/V as soon as the layer is done,
so its peak should be the compressed cache plus one layer's working set, not the dense cache.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

POLICIES = {
    "dense": {},
    "kivi4": dict(kv="kivi", k_bits=4, v_bits=4),
    "kivi2": dict(kv="kivi", k_bits=2, v_bits=2),
    "leank0.7": dict(kv="leank", ratio=0.7),
    "leank0.7+kivi2": dict(kv="leank+kivi", ratio=0.7, k_bits=2, v_bits=2),
}


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(model: str | None, tokens: int, policy: str) -> dict:
    import torch

    import leank
    from decode_cpu import context_ids
    from leank.masks.choose import build_policy

    m = leank.load(model, device="cpu")
    pol = build_policy(m, **POLICIES[policy])
    ids = context_ids(m.tokenize, tokens)
    cache = m.new_cache(policy=pol)
    base = status("VmRSS")
    # VmHWM can only be reset by writing to /proc/self/clear_refs; do it so the peak is the prefill's
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    with torch.inference_mode():
        m.transformer(torch.tensor([ids]), cache)
    seconds = time.perf_counter() - t0
    b = cache.nbytes()
    return {"policy": policy, "tokens": tokens, "rss_before_mib": base / 2**20,
            "peak_during_prefill_mib": status("VmHWM") / 2**20, "extra_peak_mib": (status("VmHWM") - base) / 2**20,
            "cache_mib": b.total / 2**20, "cache_allocated_mib": b.allocated / 2**20, "ratio_vs_fp16": b.ratio,
            "prefill_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--policy", action="append", choices=list(POLICIES))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.model, a.tokens, a.worker[1])))
        return
    print("| cache | tokens | RSS before prefill MiB | peak during prefill MiB | peak - before MiB | cache MiB | prefill s |")
    print("|---|---|---|---|---|---|---|")
    for policy in a.policy or list(POLICIES):
        cmd = [sys.executable, __file__, "--tokens", str(a.tokens), "--worker", "x", policy]
        if a.model:
            cmd += ["--model", a.model]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {policy} | {row['tokens']} | {row['rss_before_mib']:.0f} | {row['peak_during_prefill_mib']:.0f} | "
              f"{row['extra_peak_mib']:.0f} | {row['cache_mib']:.1f} | {row['prefill_seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
