"""End-to-end decoding on one GPU: a random-weight Llama-3.1-8B-shaped GGUF, dense cache vs LeanK + KIVI-2.

Writes the GGUF on the device (`TinySpec(fast_weights=True)`: weights tiled from one random block),
loads it with the runtime's loader (no tokenizer: token ids are drawn at random), and for each cache:
fills a 32K context per sequence with random K/V (a real 32K prefill per sequence would dominate the run;
random K/V exercise the same decode path: the compressed cache quantizes them through its kernels),
decodes greedily, and reports decode tokens/s and peak GPU memory at batch 1 and at the largest batch
whose peak stays within a fixed memory budget (predicted from batch 1's bytes per sequence, then run).

`--weights q4_k_m` writes the same shapes as a Q4_K_M-like file instead (random blocks with finite
scales: Q4_K matrices and embedding, Q6_K ffn_down and output, as llama.cpp's Q4_K_M does in most
layers), whose matrices stay in their blocks on the GPU; the GPU memory the weights take is reported
beside the file's tensor bytes.

`--llama-bin DIR` (llama.cpp's build/bin, `../shared/device/build-llamacpp-cuda.sh`) runs llama.cpp on the
same file in the same run first: `llama-bench` at the same depths with its f16 and q4_0 caches, with
`--prefill N` its N-token prompt speed, and `llama-batched-bench` at the largest batch of f16 and q4_0
caches that fits the budget; every figure lands in one table and one JSON file. `--prefill N` times
leank's N-token prefill too (dense and compressed caches).

    python bench/e2e_gpu.py --mask ../shared/data/leank-masks/llama3.1-8b-instruct.pth --budget-gib 64
    python bench/e2e_gpu.py --weights q4_k_m --contexts 0,32768 --no-largest
    python bench/e2e_gpu.py --weights q4_k_m --contexts 0,8192,32768,131072 --prefill 32768 --llama-bin /tmp/lc/build/bin
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from leank.convert.synthetic import TinySpec, write_tiny_model
from leank.kernels.gguf_cuda import TYPES
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.graph import GraphStep
from leank.runtime.arch.args import read_model_args
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.model.transformer import load_transformer
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.model.rope import hf_to_gguf_permutation

DEFAULT_MASK = Path(__file__).resolve().parents[2] / "shared/data/leank-masks/llama3.1-8b-instruct.pth"
LLAMA31_8B = dict(arch="llama", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, context_length=131072,
                  rope_base=500000.0, tied=False, tensor_type="F16", vocab_size=128256, fast_weights=True)
WEIGHTS = {"f16": dict(tensor_type="F16"),
           "q4_k_m": dict(tensor_type="Q4_K", type_overrides={"ffn_down": "Q6_K", "output": "Q6_K"})}
FILL_CHUNK = 2048  # tokens appended at a time when filling (bounds the compressed cache's dense staging)


def gib(n: float) -> float:
    return n / 2**30


def fill(cache, args, n_tokens: int, gen) -> None:
    """Every layer of `cache` holds `n_tokens` random keys/values per sequence."""
    B, H, D = cache.batch, args.n_kv_heads, args.head_dim
    for layer in range(args.n_layers):
        for t0 in range(0, n_tokens, FILL_CHUNK):
            T = min(FILL_CHUNK, n_tokens - t0)
            k = torch.empty(B, H, T, D, dtype=cache.dtype, device="cuda").normal_(0, 1, generator=gen)
            v = torch.empty(B, H, T, D, dtype=cache.dtype, device="cuda").normal_(0, 1, generator=gen)
            cache.append(layer, k, v)
            if isinstance(cache, CompressedCache):
                cache._compact(layer)


def make_cache(kind: str, policy, args, batch: int, dtype, capacity: int):
    if kind == "dense":
        return DenseCache(args.n_layers, args.n_kv_heads, args.head_dim, batch, device="cuda", dtype=dtype,
                          capacity=capacity)
    return CompressedCache(policy, args, batch, device="cuda", dtype=dtype, capacity=capacity)


@torch.inference_mode()
def run(model, kind: str, policy, args, batch: int, context: int, steps: int, gen, engine: str = "graph",
        profile: int = 0) -> dict:
    """Fill, then decode `steps` tokens greedily (argmax on the device, the tokens read back every step as a
    chat reads them); tokens/s over the timed steps and peak memory. `engine`: "graph" (one CUDA-graph
    replay a step, `leank.runtime.graph`) or "eager" (op by op)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cache = make_cache(kind, policy, args, batch, model.dtype, context + steps + profile + 8)
    t0 = time.time()
    fill(cache, args, context, gen)
    torch.cuda.synchronize()
    fill_s = time.time() - t0
    cache_bytes = torch.cuda.memory_allocated() - before
    tokens = torch.randint(0, args.vocab_size, (batch, 1), device="cuda", generator=gen)
    step = GraphStep(model, cache) if engine == "graph" else None
    warm = 3
    for i in range(warm + steps):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.time()
        logits = step(tokens) if step is not None else model(tokens, cache)[:, -1]
        tokens = logits.argmax(-1, keepdim=True)
        tokens.cpu()  # the one host sync a step
    torch.cuda.synchronize()
    dt = time.time() - t0
    kernels = kernel_profile(lambda t: step(t) if step is not None else model(t, cache)[:, -1], tokens, profile) if profile else None
    out = dict(kind=kind, engine=engine, batch=batch, context=context, steps=steps, fill_seconds=fill_s,
               tokens_per_second=batch * steps / dt, ms_per_step=1000 * dt / steps,
               cache_gib=gib(cache_bytes), peak_gib=gib(torch.cuda.max_memory_allocated()),
               captures=step.captures if step is not None else 0,
               attention=getattr(getattr(cache, "ops", None), "name", "torch"))
    if kernels is not None:
        out["kernels"] = kernels
    del cache, logits, tokens, step
    return out


def llama_cpp(bin_dir: Path, gguf: Path, depths: list[int], prefill: int, batch_ctx: int, budget_gib: float,
              file_gib: float) -> list[dict]:
    """llama.cpp on the same file: llama-bench decode (64 tokens) at each depth with f16 and q4_0 K/V,
    its `prefill`-token prompt speed, and llama-batched-bench's decode at the largest batch of `batch_ctx`
    tokens a sequence whose cache fits `budget_gib` beside the weights and 2 GiB of buffers (Llama-3.1-8B's
    cache: 2 x 32 layers x 8 KV heads x 128 values a token, 2 bytes each in f16, 18 per 32 in q4_0)."""
    rows = []

    def run(cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise SystemExit(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        return r.stdout

    bench, batched = str(bin_dir / "llama-bench"), str(bin_dir / "llama-batched-bench")
    for kv in ("f16", "q4_0"):
        out = run([bench, "-m", str(gguf), "-ngl", "99", "-fa", "1", "-p", "0", "-n", "64", "-d",
                   ",".join(str(d) for d in depths), "-ctk", kv, "-ctv", kv, "-r", "2", "-o", "json"])
        for t in json.loads(out):
            rows.append(dict(engine="llama.cpp", kv=kv, role="batch 1", context=t["n_depth"], batch=1,
                             tokens_per_second=t["avg_ts"], stddev=t["stddev_ts"]))
    if prefill:
        out = run([bench, "-m", str(gguf), "-ngl", "99", "-fa", "1", "-p", str(prefill), "-n", "0", "-r", "2",
                   "-o", "json"])
        for t in json.loads(out):
            rows.append(dict(engine="llama.cpp", kv="f16", role=f"prefill {prefill}", context=0, batch=1,
                             tokens_per_second=t["avg_ts"], stddev=t["stddev_ts"]))
    if batch_ctx:
        per_token = {"f16": 2 * 32 * 8 * 128 * 2, "q4_0": 2 * 32 * 8 * 128 * 18 / 32}  # Llama-3.1-8B's cache
        for kv, nbytes in per_token.items():
            npl = int((budget_gib - file_gib - 2.0) * 2**30 // (nbytes * (batch_ctx + 16)))  # 2 GiB of buffers
            out = run([batched, "-m", str(gguf), "-ngl", "99", "-fa", "on", "-npp", str(batch_ctx), "-ntg", "16",
                       "-npl", str(npl), "-c", str(npl * (batch_ctx + 16)), "-ctk", kv, "-ctv", kv,
                       "--output-format", "jsonl"])
            for line in out.splitlines():  # one JSON object a configuration (log lines may share stdout)
                start = line.find("{")
                t = json.loads(line[start:]) if start >= 0 else {}
                if "speed_tg" in t:
                    rows.append(dict(engine="llama.cpp", kv=kv, role=f"largest batch within {budget_gib:g} GiB",
                                     context=t["pp"], batch=t["pl"], tokens_per_second=t["speed_tg"],
                                     prefill_tokens_per_second=t["speed_pp"]))
    return rows


@torch.inference_mode()
def prefill_speed(model, kind: str, policy, args, n: int, gen) -> dict:
    """leank's prompt speed: `n` random tokens prefilled into an empty cache (one sequence)."""
    from leank.runtime.decode import prefill

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = make_cache(kind, policy, args, 1, model.dtype, n + 8)
    tokens = torch.randint(0, args.vocab_size, (1, n), device="cuda", generator=gen)
    prefill(model, make_cache(kind, policy, args, 1, model.dtype, 1024), tokens[:, :512])  # warm-up
    torch.cuda.synchronize()
    t0 = time.time()
    prefill(model, cache, tokens)
    torch.cuda.synchronize()
    dt = time.time() - t0
    return dict(kind=kind, engine="leank", role=f"prefill {n}", batch=1, context=0, tokens_per_second=n / dt,
                seconds=dt, peak_gib=gib(torch.cuda.max_memory_allocated()))


def kernel_profile(step, tokens, n: int, top: int = 30) -> dict:
    """The GPU time of `n` more steps by kernel (torch.profiler, CUPTI: kernels inside a graph replay are
    recorded one by one): per step, the total and the `top` kernels (name, microseconds, launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            tokens = step(tokens).argmax(-1, keepdim=True)
            tokens.cpu()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = e.cuda_time_total if us is None else us
        if us > 0 and e.count:
            rows.append((e.key, us / n, e.count / n))
    rows.sort(key=lambda r: -r[1])
    return dict(steps=n, gpu_us_per_step=sum(r[1] for r in rows),
                top=[dict(name=k[:160], us_per_step=round(us, 1), per_step=round(c, 2)) for k, us, c in rows[:top]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, default=DEFAULT_MASK)
    ap.add_argument("--gguf", type=Path, default=None, help="default /tmp/llama31-8b-random[-q4_k_m].gguf")
    ap.add_argument("--weights", default="f16", choices=sorted(WEIGHTS))
    ap.add_argument("--contexts", default="32768", help="comma-separated contexts for the batch-1 runs")
    ap.add_argument("--no-largest", action="store_true", help="skip the largest-batch runs")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--engine", default="graph", choices=["graph", "eager", "both"],
                    help="graph: one CUDA-graph replay a step; eager: op by op; both: batch 1 runs twice")
    ap.add_argument("--budget-gib", type=float, default=64.0, help="GPU memory budget for the largest batch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=Path("bench/out/e2e_gpu.json"))
    ap.add_argument("--llama-bin", type=Path, default=None, metavar="DIR",
                    help="llama.cpp's bin folder: run llama-bench / llama-batched-bench on the same file first")
    ap.add_argument("--prefill", type=int, default=0, metavar="N", help="also time an N-token prefill")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after each batch-1 run, profile N more steps by kernel (torch.profiler)")
    args_cli = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    dtype = getattr(torch, args_cli.dtype)
    card = torch.cuda.get_device_properties(0).name
    if args_cli.gguf is None:
        suffix = "" if args_cli.weights == "f16" else f"-{args_cli.weights}"
        args_cli.gguf = Path(f"/tmp/llama31-8b-random{suffix}.gguf")
    if not args_cli.gguf.exists():
        t0 = time.time()
        write_tiny_model(args_cli.gguf, TinySpec(**{**LLAMA31_8B, **WEIGHTS[args_cli.weights]}))
        console.print(f"wrote {args_cli.gguf} ({gib(args_cli.gguf.stat().st_size):.1f} GiB) in {time.time() - t0:.0f} s")
    peer = []
    if args_cli.llama_bin is not None:  # llama.cpp first: the GPU is all its own
        t0 = time.time()
        peer = llama_cpp(args_cli.llama_bin, args_cli.gguf, [int(c) for c in args_cli.contexts.split(",")],
                         args_cli.prefill, 0 if args_cli.no_largest else int(args_cli.contexts.split(",")[-1]),
                         args_cli.budget_gib, gib(args_cli.gguf.stat().st_size))
        for r in peer:
            console.print(r)
        console.print(f"llama.cpp: {time.time() - t0:.0f} s")
    t0 = time.time()
    f = GGUFFile(args_cli.gguf)
    margs = read_model_args(f)
    model = load_transformer(f, margs, torch.device("cuda"), dtype)
    from leank.kernels import tilelang_ops  # the block kernels compiled in parallel before any timing

    tilelang_ops.precompile(tilelang_ops.gemv_specs({f.tensor_type_name(n) for n in f.tensors} & set(TYPES), dtype)
                            + tilelang_ops.step_specs(dtype, margs.rope_mode == "neox"))
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    tensor_bytes = sum(t.n_bytes for t in f.tensors.values())
    console.print(f"loaded in {time.time() - t0:.0f} s: {gib(weights):.2f} GiB of weights on {card} "
                  f"({weights / tensor_bytes:.3f}x the file's {gib(tensor_bytes):.2f} GiB of tensors)")

    kept_hf = torch.load(args_cli.mask, weights_only=True) > 0.5  # (layers, kv heads, 128), HF order
    perm = hf_to_gguf_permutation(margs.arch, margs.head_dim)
    mask = Mask(kept_hf[..., perm])  # gguf channel j = HF channel perm[j]
    policy = CachePolicy(mask=mask, k_bits=2, v_bits=2, group_size=32)
    gqa, D = margs.n_heads // margs.n_kv_heads, margs.head_dim
    counts = mask.kept.sum(-1).flatten().tolist()
    specs = [s for per_seq in (False, True) for s in
             tilelang_ops.decode_specs(D, gqa, dtype, counts, 2, 2, 32, per_seq)
             + tilelang_ops.decode_specs(D, gqa, dtype, [], 16, 16, 1, per_seq)]
    specs += [tilelang_ops.quantize_specs(c, 2, 32, dtype, "quantize_k") for c in sorted(set(counts)) if c]
    specs.append(tilelang_ops.quantize_specs(D, 2, 32, dtype, "quantize_v"))
    tilelang_ops.precompile(specs)  # the attention kernels too, before any timing
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    contexts = [int(c) for c in args_cli.contexts.split(",")]
    for kind in ("dense", "leank+kivi2"):
        if args_cli.prefill:
            r = prefill_speed(model, kind, policy, margs, args_cli.prefill, gen)
            results.append(r)
            console.print(r)
        engines = ["graph", "eager"] if args_cli.engine == "both" else [args_cli.engine]
        for context in contexts:
            for engine in engines:
                one = run(model, kind, policy, margs, 1, context, args_cli.steps, gen, engine, args_cli.profile)
                one["role"] = "batch 1"
                results.append(one)
                kernels = one.pop("kernels", None)
                console.print(one)
                if kernels is not None:
                    one["kernels"] = kernels
                    console.print(f"GPU time per step {kernels['gpu_us_per_step']:.0f} us (wall {1000 * one['ms_per_step']:.0f} us):")
                    for r in kernels["top"]:
                        console.print(f"  {r['us_per_step']:8.1f} us  x{r['per_step']:<6g} {r['name'][:110]}")
        if args_cli.no_largest:
            continue
        per_seq = one["cache_gib"]
        overhead = one["peak_gib"] - gib(weights) - per_seq  # activations, workspaces at batch 1
        batch = int((args_cli.budget_gib - gib(weights) - overhead) // (per_seq * 1.02))
        while batch >= 1:
            try:
                r = run(model, kind, policy, margs, batch, contexts[-1], max(4, args_cli.steps // 2), gen, engines[0])
            except torch.cuda.OutOfMemoryError:
                r = None
            if r is not None and r["peak_gib"] <= args_cli.budget_gib:
                r["role"] = f"largest batch within {args_cli.budget_gib:g} GiB"
                results.append(r)
                console.print(r)
                break
            why = "OOM" if r is None else "peak %.1f GiB" % r["peak_gib"]
            console.print(f"{kind}: batch {batch} does not fit ({why})")
            batch = int(batch * 0.95)
    table = Table(title=f"decode, Llama-3.1-8B shapes (random {args_cli.weights} weights, {args_cli.dtype}), {card}")
    for col in ("engine", "cache", "mode", "role", "context", "batch", "tokens/s", "ms/step", "cache GiB", "peak GiB"):
        table.add_column(col, justify="right")
    for r in peer:
        table.add_row("llama.cpp", r["kv"], "", r["role"], str(r["context"]), str(r["batch"]),
                      f"{r['tokens_per_second']:.1f}", "", "", "")
    for r in results:
        ms = f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else ""
        cache = f"{r['cache_gib']:.2f}" if "cache_gib" in r else ""
        table.add_row("leank", r["kind"], r.get("engine", ""), r["role"], str(r["context"]), str(r["batch"]),
                      f"{r['tokens_per_second']:.1f}", ms, cache, f"{r['peak_gib']:.2f}")
    console.print(table)
    args_cli.out.parent.mkdir(parents=True, exist_ok=True)
    args_cli.out.write_text(json.dumps(dict(card=card, date=str(date.today()), dtype=args_cli.dtype,
                                            weights=args_cli.weights, weights_gib=gib(weights),
                                            tensor_gib=gib(tensor_bytes), budget_gib=args_cli.budget_gib,
                                            context_filled_with="random K/V (no prefill)", results=results,
                                            llama_cpp=peer), indent=1))
    console.print(f"wrote {args_cli.out}")


if __name__ == "__main__":
    main()
