"""Where a CPU decode step goes: matrix products by GGUF type, attention, norms, and the rest.

    python bench/profile_cpu.py --model ~/.cache/leank/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
        --ctx 16 --steps 16 --threads 2

Prefills --ctx random tokens, then times --steps decode steps, wrapping `QuantLinear.__call__`, the
cache's `attend` and the model's `rms_norm` with timers (perf_counter; ~1 µs a call). Prints the time
per step of each part and the matrices' effective bandwidth (bytes of blocks read per second spent in
their calls). For a table in bench/RESULTS.md; it asserts nothing.

A decode step normally runs as one ggml program (`CpuDecodeStep`: n_layers + 1 graphs, each a layer's
products, norms and SwiGLU); its segments are timed as "ggml program segments" (their bandwidth: every
matrix's blocks over the segments' time), beside `Attention.rotate` (torch's split and RoPE) and the
cache. `LEANK_GGML_PROGRAM=0` profiles the per-product path instead.
"""
from __future__ import annotations

import argparse
import collections
import time

import leank  # first: it sets OpenMP's wait policy, which libgomp reads when torch loads it
import torch

from leank.kernels.cpu import BLOCK_TYPES as BLOCK_NAMES  # GGML type id -> name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", default=None, help="cache policy, as `build_policy(kv=...)` (default dense)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from leank.masks.choose import build_policy
    from leank.runtime.model import transformer as model_mod
    from leank.kernels import ggml_cpu
    from leank.runtime.model.linear import QuantLinear
    from leank.runtime.model.transformer import Attention

    m = leank.load(a.model, device="cpu")
    cache = m.new_cache() if a.kv is None else m.new_cache(policy=build_policy(m, kv=a.kv))
    times: dict = collections.defaultdict(float)
    calls: dict = collections.Counter()
    nbytes: dict = collections.Counter()
    on = [False]

    def timed(key_fn, fn):
        def wrapper(*args, **kw):
            if not on[0]:
                return fn(*args, **kw)
            t = time.perf_counter()
            out = fn(*args, **kw)
            key = key_fn(*args)
            times[key] += time.perf_counter() - t
            calls[key] += 1
            return out
        return wrapper

    q_call = QuantLinear.__call__

    def q_key(self, x):
        key = "matmul " + "+".join(BLOCK_NAMES.get(t, str(t)) for _, t in self.parts) + f" ({self.out_features}x{self.k})"
        if on[0]:
            nbytes[key] += self.nbytes
        return key

    QuantLinear.__call__ = timed(q_key, q_call)
    attend = type(cache).attend
    type(cache).attend = timed(lambda self, layer, q: "attention (cache.attend)", attend)
    model_mod.rms_norm = timed(lambda x, w, eps: "rms_norm", model_mod.rms_norm)
    Attention.rotate = timed(lambda self, *a: "split q|k|v, RoPE (Attention.rotate)", Attention.rotate)
    append = type(cache).append
    type(cache).append = timed(lambda self, *a: "cache.append", append)
    tr = m.transformer
    matrix_bytes = sum(lin.nbytes for lin in [tr.output] + [x for b in tr.layers for x in (
        b.attention.wqkv, b.attention.wo, b.feed_forward.w_gate_up, b.feed_forward.w_down)])
    run = ggml_cpu.Program.run
    n_layers = tr.args.n_layers

    def seg_key(self, segment, *a):
        if on[0] and segment == 0:
            nbytes["ggml program segments"] += matrix_bytes
        return "ggml program segments"

    ggml_cpu.Program.run = timed(seg_key, run)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.transformer.args.vocab_size, (1, a.ctx), generator=gen)
    with torch.inference_mode():
        m.transformer(ids, cache)
        for _ in range(3):  # warm-up
            m.transformer(ids[:, :1], cache)
        on[0] = True
        t0 = time.perf_counter()
        for i in range(a.steps):
            m.transformer(ids[:, i % a.ctx : i % a.ctx + 1], cache)
        total = time.perf_counter() - t0
    step = total / a.steps
    print(f"matrices: {ggml_cpu.matmul_path()}; decode step: "
          f"{'one ggml program' if tr._cpu_steps.get(1) is not None else 'a ggml graph per product'}")
    print(f"{a.steps} steps after {a.ctx} tokens, {a.threads} threads: {step * 1e3:.1f} ms a step")
    print("| part | calls a step | ms a step | share | GB/s of blocks |")
    print("|---|---:|---:|---:|---:|")
    for key in sorted(times, key=times.get, reverse=True):
        ms = times[key] / a.steps * 1e3
        bw = f"{nbytes[key] / times[key] / 1e9:.1f}" if nbytes[key] else "-"
        print(f"| {key} | {calls[key] / a.steps:.0f} | {ms:.2f} | {times[key] / total:.0%} | {bw} |")
    rest = total - sum(times.values())
    print(f"| everything else (embedding, RoPE, SwiGLU, residuals, Python) | | {rest / a.steps * 1e3:.2f} | {rest / total:.0%} | |")
    mat = [k for k in times if k.startswith("matmul")]
    if mat:
        tm = sum(times[k] for k in mat)
        print(f"all matrices: {sum(calls[k] for k in mat) / a.steps:.0f} calls, {tm / a.steps * 1e3:.1f} ms a step, "
              f"{sum(nbytes[k] for k in mat) / tm / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
