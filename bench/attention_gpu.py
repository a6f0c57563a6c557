"""Decode attention on one GPU: dense torch SDPA vs the compressed cache's TileLang kernels.

One layer's cache of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head_dim 128, bfloat16) with the
head structure (kept channels per KV head) of one layer of the released LeanK mask, for each batch and
context: dense SDPA, LeanK fp16 (bits 16), LeanK + KIVI-4, LeanK + KIVI-2, KIVI-2 alone. Random data,
never zeros. Median time (triton.testing.do_bench after warm-up; also a CUDA-graph replay where capture
works), bytes read, and achieved bandwidth against the device-to-device copy bandwidth measured in the
same run. Prints a table and writes JSON.

    python bench/attention_gpu.py --mask ../shared/data/leank-masks/llama3.1-8b-instruct.pth
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from leank.kernels import tilelang_ops as tlo
from leank.kernels.quant import packed_width
from leank.kernels.reference import MiddleGroup
from leank.runtime.cache.compressed import head_groups
from leank.runtime.cache.plan import region_sizes
from leank.runtime.cache.policy import CachePolicy

HQ, HKV, D, GROUP = 32, 8, 128, 32
DTYPE = torch.bfloat16
DEFAULT_MASK = Path(__file__).resolve().parents[2] / "shared/data/leank-masks/llama3.1-8b-instruct.pth"
METHODS = {  # name: (pruned, k_bits, v_bits)
    "LeanK fp16": (True, 16, 16),
    "LeanK+KIVI-4": (True, 4, 4),
    "LeanK+KIVI-2": (True, 2, 2),
    "KIVI-2": (False, 2, 2),
}
GRAPH_METHOD = "LeanK+KIVI-2"  # the method also timed the way a CUDA-graph decode engine calls it


def typical_layer(kept: torch.Tensor) -> int:
    """The layer whose kept-channel total equals the mask's mean (or is nearest), with the number of
    all-pruned heads nearest the mean among those; ties: the lowest index."""
    counts = kept.sum(-1)
    totals = counts.sum(-1).float()
    zeros = (counts == 0).sum(-1).float()
    mean_total, mean_zeros = totals.mean(), zeros.mean()
    key = [(abs(totals[i] - mean_total).item(), abs(zeros[i] - mean_zeros).item(), i) for i in range(kept.shape[0])]
    return min(key)[2]


def rand(shape, dtype, gen) -> torch.Tensor:
    """Random values made in place (no float32 temporary: the largest tensors are tens of GB)."""
    t = torch.empty(shape, dtype=dtype, device="cuda")
    if dtype == torch.uint8:
        return t.random_(0, 256, generator=gen)
    return t.normal_(0.1, 0.5, generator=gen)


def make_layer(kept_layer: torch.Tensor, B: int, n_tokens: int, k_bits: int, v_bits: int, gen,
               capacity: int | None = None):
    """One layer's compressed cache as `CompressedCache` lays it out, filled with random values.

    With `capacity`, the buffers hold `capacity` tokens' regions and the call is the CUDA-graph one:
    lengths in device tensors (returned as the sixth item), `middle_len` the middle capacity; the bytes
    counted are still those of `n_tokens`."""
    policy = CachePolicy(k_bits=k_bits, v_bits=v_bits, group_size=GROUP)
    F_, M = region_sizes(policy, n_tokens)
    if capacity is not None:
        fn, mn = F_, M
        F_, M = (max(a, b) for a, b in zip(region_sizes(policy, capacity), (fn, mn)))
    full_k, full_v = rand((B, HKV, F_, D), DTYPE, gen), rand((B, HKV, F_, D), DTYPE, gen)
    groups = []
    for heads, channels in head_groups(kept_layer):
        nh, c = channels.shape
        g = MiddleGroup(heads.cuda(), channels.cuda(), None, None)
        if k_bits == 16:
            g.k = rand((B, nh, M, c), DTYPE, gen)
        else:
            g.k = rand((B, nh, M, packed_width(c, k_bits)), torch.uint8, gen)
            g.k_scale = rand((B, nh, M // GROUP, c), torch.float16, gen).abs_().mul_(0.1).add_(0.01)
            g.k_min = rand((B, nh, M // GROUP, c), torch.float16, gen)
        if v_bits == 16:
            g.v = rand((B, nh, M, D), DTYPE, gen)
        else:
            g.v = rand((B, nh, M, packed_width(D, v_bits)), torch.uint8, gen)
            g.v_scale = rand((B, nh, M, D // GROUP), torch.float16, gen).abs_().mul_(0.1).add_(0.01)
            g.v_min = rand((B, nh, M, D // GROUP), torch.float16, gen)
        groups.append(g)
    nbytes = full_k.nbytes + full_v.nbytes + sum(
        t.nbytes for g in groups for t in (g.k, g.v, g.k_scale, g.k_min, g.v_scale, g.v_min) if t is not None)
    if capacity is None:
        return full_k, full_v, groups, M, nbytes
    nbytes = (full_k.nbytes + full_v.nbytes) * fn // F_ + sum(
        t.nbytes for g in groups for t in (g.k, g.v, g.k_scale, g.k_min, g.v_scale, g.v_min) if t is not None) * mn // M
    lens = tuple(torch.full((B,), x, dtype=torch.int32, device="cuda") for x in (fn, mn))
    return full_k, full_v, groups, M, nbytes, lens


def time_ms(fn) -> tuple[float, float | None]:
    """(median ms of eager calls, median ms of a CUDA-graph replay or None if capture fails)."""
    import triton.testing

    eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    graph = None
    try:
        torch.cuda.synchronize()
        graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report, keep the eager figure
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
    return eager, graph


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read and written."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * nbytes / ms / 1e6


TUNING_ENV = {"MIDDLE": "LEANK_TL_MIDDLE", "MIDDLE16": "LEANK_TL_MIDDLE16", "FULL": "LEANK_TL_FULL",
              "BPS": "LEANK_TL_BLOCKS_PER_SM", "FAST": "LEANK_TL_FAST", "WAVES": "LEANK_TL_WAVES",
              "MINT": "LEANK_TL_MIN_TILES"}


def apply_variant(variant: str) -> None:
    """Set the tuning environment of a variant "MIDDLE=64,128,0,8|BPS=8|..." ("" = the defaults)."""
    import os

    for env in TUNING_ENV.values():
        os.environ.pop(env, None)
    for part in filter(None, variant.split("|")):
        key, value = part.split("=")
        os.environ[TUNING_ENV[key]] = value


def sweep(variants: list[str], kept: torch.Tensor, console, gen) -> tuple[list[dict], str]:
    """Kernel tunings, each checked against the reference on a small case, then timed at 32K context,
    batch 1, 8 and 64, for every compressed method. Returns the rows and the fastest correct variant
    (geometric mean of its times)."""
    from leank.kernels import reference

    ones = torch.ones_like(kept)
    specs = []
    for var in variants:
        apply_variant(var)
        for pruned, kb, vb in METHODS.values():
            specs += tlo.decode_specs(D, HQ // HKV, DTYPE, (kept if pruned else ones).sum(-1).tolist(), kb, vb, GROUP)
    t0 = time.time()
    failed = tlo.precompile(specs)
    console.print(f"sweep: {len(set(specs))} kernels ready in {time.time() - t0:.1f} s ({len(failed)} failed)")
    out = []
    scale = 1 / math.sqrt(D)
    for var in variants:
        apply_variant(var)
        row = dict(variant=var)
        try:
            for name, (pruned, kb, vb) in METHODS.items():
                fk, fv, groups, M, _ = make_layer(kept if pruned else ones, 2, 5000, kb, vb, gen)
                q = rand((2, HQ, 1, D), DTYPE, gen)
                a = tlo.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale)
                r = reference.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale)
                row[f"{name} rel_err"] = ((a.float() - r.float()).norm() / r.float().norm()).item()
                for B in (1, 8, 64):
                    fk, fv, groups, M, nbytes = make_layer(kept if pruned else ones, B, 32768, kb, vb, gen)
                    q = rand((B, HQ, 1, D), DTYPE, gen)
                    fn = lambda: tlo.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale)  # noqa: E731
                    eager, graph = time_ms(fn)
                    row[f"{name} B{B} ms"] = graph or eager
                    del fk, fv, groups
                    torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a tuning that fails is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        console.print(row)
        out.append(row)
    good = [r for r in out if "error" not in r and all(v <= 1e-2 for k, v in r.items() if k.endswith("rel_err"))]
    best = min(good, key=lambda r: sum(math.log(v) for k, v in r.items() if k.endswith(" ms")))["variant"] if good else ""
    console.print(f"fastest correct variant: {best!r}")
    return out, best


def breakdown(kept: torch.Tensor, n_tokens: int, batches: list[int], console, gen) -> list[dict]:
    """Graph time of one LeanK+KIVI-2 call with only one of its kernels launched (the others skipped;
    their outputs are left as they are, which changes no kernel's work), to place the time of a call."""
    pruned, kb, vb = METHODS[GRAPH_METHOD]
    scale = 1 / math.sqrt(D)
    real = tlo.kernel
    out = []
    try:
        for B in batches:
            fk, fv, groups, M, _ = make_layer(kept if pruned else torch.ones_like(kept), B, n_tokens, kb, vb, gen)
            q = rand((B, HQ, 1, D), DTYPE, gen)
            parts = ["all", "full", "combine"] + [f"middle c={g.channels.shape[1]}" for g in groups]
            row = dict(batch=B, context=n_tokens)
            for part in parts:
                def only(spec, part=part):
                    name = spec[0] if spec[0] != "middle" else f"middle c={spec[4]}"
                    return real(spec) if part in ("all", name) else (lambda *a: None)
                tlo.kernel = only
                fn = lambda: tlo.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale)  # noqa: E731
                row[part] = time_ms(fn)[1]
            tlo.kernel = real
            console.print(f"breakdown {GRAPH_METHOD} B={B} ctx={n_tokens}: " +
                          ", ".join(f"{k} {v * 1000:.1f} us" for k, v in row.items() if isinstance(v, float)))
            out.append(row)
            del fk, fv, groups
            torch.cuda.empty_cache()
    finally:
        tlo.kernel = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, default=DEFAULT_MASK)
    ap.add_argument("--layer", type=int, default=None, help="mask layer whose head structure is used (default: typical)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--memory-fraction", type=float, default=0.85, help="skip cases whose dense K/V exceed this")
    ap.add_argument("--capacity", type=int, default=131072, help="also time the CUDA-graph call of "
                    f"{GRAPH_METHOD} with buffers for this many tokens and lengths in device tensors (0: no)")
    ap.add_argument("--breakdown", default="", help="contexts at which to time each kernel of a "
                    f"{GRAPH_METHOD} call alone, at batch 1 and 64 (e.g. 32768)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/attention_gpu.json"))
    ap.add_argument("--sweep", default="", help="kernel tunings to compare first, ';'-separated, e.g. "
                    "'MIDDLE=64,128,0,8|BPS=8;' (empty: the defaults); the fastest is used for the main run")
    ap.add_argument("--best-env", type=Path, default=None, help="write the fastest variant as shell exports here")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    kept_all = torch.load(args.mask, weights_only=True) > 0.5  # (32, 8, 128), HF channel order
    layer = typical_layer(kept_all) if args.layer is None else args.layer
    kept = kept_all[layer]
    ones = torch.ones_like(kept)
    props = torch.cuda.get_device_properties(0)
    card = props.name
    console.print(f"[bold]{card}[/], torch {torch.__version__}, mask layer {layer} kept counts "
                  f"{kept.sum(-1).tolist()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sweep_rows, best = sweep(args.sweep.split(";"), kept, console, gen) if args.sweep else ([], None)
    if best is not None:
        apply_variant(best)
        if args.best_env:
            import os

            args.best_env.write_text("".join(f"export {e}={os.environ[e]}\n" for e in TUNING_ENV.values()
                                             if e in os.environ))
    t0 = time.time()
    for pruned, kb, vb in METHODS.values():  # compile (or load) every kernel before timing
        tlo.precompile(tlo.decode_specs(D, HQ // HKV, DTYPE, (kept if pruned else ones).sum(-1).tolist(), kb, vb, GROUP))
    console.print(f"kernels ready in {time.time() - t0:.1f} s")
    parts = [r for n in filter(None, args.breakdown.split(",")) for r in breakdown(kept, int(n), [1, 64], console, gen)]
    copy_gbps = copy_bandwidth_gbps()
    console.print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    rows = []
    scale = 1 / math.sqrt(D)
    for n_tokens in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            dense_bytes = 2 * B * HKV * n_tokens * D * 2
            if dense_bytes > args.memory_fraction * props.total_memory:
                console.print(f"skip B={B} ctx={n_tokens}: dense K/V {dense_bytes / 2**30:.0f} GiB")
                continue
            q = rand((B, HQ, 1, D), DTYPE, gen)
            k, v = rand((B, HKV, n_tokens, D), DTYPE, gen), rand((B, HKV, n_tokens, D), DTYPE, gen)
            fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
            eager, graph = time_ms(fn)
            base = graph or eager
            rows.append(dict(method="dense SDPA", batch=B, context=n_tokens, ms=eager, graph_ms=graph,
                             bytes=dense_bytes, speedup=1.0))
            del k, v
            torch.cuda.empty_cache()
            for name, (pruned, kb, vb) in METHODS.items():
                fk, fv, groups, M, nbytes = make_layer(kept if pruned else ones, B, n_tokens, kb, vb, gen)
                fn = lambda: tlo.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale)  # noqa: E731
                eager, graph = time_ms(fn)
                rows.append(dict(method=name, batch=B, context=n_tokens, ms=eager, graph_ms=graph, bytes=nbytes,
                                 speedup=base / (graph or eager)))
                del fk, fv, groups
                torch.cuda.empty_cache()
            if args.capacity and n_tokens <= args.capacity:
                # the CUDA-graph call of a decode engine: buffers and split plan for `capacity` tokens,
                # lengths (n_tokens) read from device memory
                pruned, kb, vb = METHODS[GRAPH_METHOD]
                fk, fv, groups, M, nbytes, (fl, ml) = make_layer(kept if pruned else ones, B, n_tokens, kb, vb, gen,
                                                                 capacity=args.capacity)
                fn = lambda: tlo.compressed_attention(q, fk, fv, groups, M, kb, vb, GROUP, scale, fl, ml)  # noqa: E731
                eager, graph = time_ms(fn)
                rows.append(dict(method=f"{GRAPH_METHOD} @cap{args.capacity // 1024}K", batch=B, context=n_tokens,
                                 ms=eager, graph_ms=graph, bytes=nbytes, speedup=base / (graph or eager)))
                del fk, fv, groups
                torch.cuda.empty_cache()
            n_rows = 6 if args.capacity and n_tokens <= args.capacity else 5
            for r in rows[-n_rows:]:
                t = r["graph_ms"] or r["ms"]
                r["gbps"] = r["bytes"] / t / 1e6
                r["copy_fraction"] = r["gbps"] / copy_gbps
            console.print(f"B={B} ctx={n_tokens}: " + ", ".join(f"{r['method']} {(r['graph_ms'] or r['ms']):.3f} ms"
                                                               for r in rows[-n_rows:]))
    table = Table(title=f"decode attention, one layer, {card} (bf16, 32 q / 8 kv heads, d 128, mask layer {layer})")
    for col in ("method", "batch", "context", "ms (eager)", "ms (graph)", "MB read", "GB/s", "% copy BW", "x dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], str(r["batch"]), str(r["context"]), f"{r['ms']:.4f}",
                      "-" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}", f"{r['bytes'] / 1e6:.1f}",
                      f"{r['gbps']:.0f}", f"{100 * r['copy_fraction']:.0f}", f"{r['speedup']:.2f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(card=card, date=str(date.today()), torch=torch.__version__,
                                        host=platform.node(), copy_gbps=copy_gbps, mask_layer=layer,
                                        kept_counts=kept.sum(-1).tolist(), middle_tuning=tlo.MIDDLE_TUNING,
                                        tuning_env={e: __import__("os").environ.get(e) for e in TUNING_ENV.values()},
                                        sweep=sweep_rows, breakdown=parts, rows=rows), indent=1, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
