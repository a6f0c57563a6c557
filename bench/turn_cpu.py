"""A chat turn after a long history, in process: the time of one forward pass of --new tokens after
--history tokens, dense cache against a compressed one (issue 15's time to first token of a late turn).

    nice -n 10 python bench/turn_cpu.py                       # SmolLM2, 26 tokens after 700, 2 threads
    nice -n 10 python bench/turn_cpu.py --kv dense,leank+kivi --history 700 --new 26 --reps 9

Per cache: --history random tokens prefilled (untimed), then --reps passes of --new tokens, each on a
copy of the prefilled cache (so every pass sees the same past: with leank+kivi's sink 128 + recent 512,
700 tokens already have a middle region and the 26 new ones push the next block into it). Prints the
median pass, the median time in `cache.attend` and, for compressed caches, of that the attention calls
over both regions (`ops.compressed_attention`) and moving tokens to the middle (`_compact`). For bench/RESULTS.md;
it asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import leank  # first: it sets OpenMP's wait policy, which libgomp reads when torch loads it
import torch

from leank.masks.choose import build_policy
from leank.runtime.cache.compressed import CompressedCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--kv", default="dense,leank+kivi", help="comma-separated `--kv` choices")
    ap.add_argument("--history", type=int, default=700)
    ap.add_argument("--new", type=int, default=26)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = leank.load(a.model, device="cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.transformer.args.vocab_size, (1, a.history + a.new), generator=gen)
    parts = {"attend": 0.0, "attention": 0.0, "compact": 0.0}
    on = [False]

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            if on[0]:
                parts[name] += time.perf_counter() - t
            return out
        return wrapper

    compact = CompressedCache._compact
    CompressedCache._compact = timed("compact", compact)
    caches = {}
    for kv in a.kv.split(","):
        cache = m.new_cache() if kv == "dense" else m.new_cache(policy=build_policy(m, kv=kv))
        if not hasattr(type(cache), "_untimed_attend"):
            type(cache)._untimed_attend = type(cache).attend
            type(cache).attend = timed("attend", type(cache)._untimed_attend)
        if isinstance(cache, CompressedCache):
            attn = cache.ops.compressed_attention
            cache.ops = copy.copy(cache.ops)
            cache.ops.compressed_attention = timed("attention", attn)
        with torch.inference_mode():
            m.transformer(ids[:, : a.history], cache)
        caches[kv] = cache
    got = {kv: {"pass": [], "attend": [], "attention": [], "compact": []} for kv in caches}
    with torch.inference_mode():
        for _ in range(a.reps + 1):  # the caches take turns, so a burst of load falls on both; the first warms up
            for kv, cache in caches.items():
                c = copy.deepcopy(cache)
                parts.update(attend=0.0, attention=0.0, compact=0.0)
                on[0] = True
                t = time.perf_counter()
                m.transformer(ids[:, a.history :], c)
                got[kv]["pass"].append(time.perf_counter() - t)
                on[0] = False
                for key in ("attend", "attention", "compact"):
                    got[kv][key].append(parts[key])
    med = (lambda xs: statistics.median(xs[1:]) * 1e3)
    for kv, cache in caches.items():
        g = got[kv]
        line = (f"{kv:>12}: {a.new} tokens after {a.history}: {med(g['pass']):7.1f} ms (median of {a.reps}), "
                f"of which cache.attend {med(g['attend']):.1f} ms")
        if isinstance(cache, CompressedCache):
            line += f" (attention calls {med(g['attention']):.1f} ms, moving to the middle {med(g['compact']):.1f} ms)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
