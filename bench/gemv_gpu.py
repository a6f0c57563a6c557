"""Matrices in GGUF blocks on one GPU (issue 14): the TileLang gemv and decode-then-cuBLAS paths against a
bfloat16 matrix multiplied by cuBLAS, on Llama-3.1-8B's matrix shapes with random blocks.

For each shape and type, rows of activations M = 1, 4, 8 (the gemv kernel; decode steps of 1-8
sequences) and 16, 64 (a slice decoded to bfloat16, then cuBLAS), timed as CUDA graphs of 20 calls
(no launch overhead), median of 5 replays. GB/s counts the bytes of the blocks read (or of the
bfloat16 matrix for cuBLAS).

    python bench/gemv_gpu.py [--out bench/out/gemv_gpu.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from blocks import random_blocks  # noqa: E402  tests/blocks.py
from leank.runtime.model.linear import CudaQuantLinear  # noqa: E402

# (name, rows, columns, type): the matrices of one Llama-3.1-8B layer and its output, Q4_K_M-like
SHAPES = [("wqkv", 6144, 4096, "Q4_K"), ("wo", 4096, 4096, "Q4_K"), ("w_gate_up", 28672, 4096, "Q4_K"),
          ("w_down", 4096, 14336, "Q6_K"), ("output", 128256, 4096, "Q6_K"), ("w_gate_up q8_0", 28672, 4096, "Q8_0"),
          ("w_gate_up q4_0", 28672, 4096, "Q4_0")]
ROWS = (1, 4, 8, 16, 64)
CALLS = 20


def timed(fn) -> float:
    """Milliseconds per call of `fn`: a CUDA graph of CALLS calls, median of 5 replays."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / CALLS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/gemv_gpu.json"))
    a = ap.parse_args()
    from leank.kernels import tilelang_ops

    card = torch.cuda.get_device_properties(0).name
    tilelang_ops.precompile(tilelang_ops.gemv_specs({t for *_, t in SHAPES}, torch.bfloat16))
    rows = []
    print(f"{'matrix':16} {'type':5} {'M':>3} {'blocks ms':>10} {'GB/s':>7} {'bf16 ms':>9} {'GB/s':>7} {'x bf16':>7}")
    for name, n, k, t in SHAPES:
        blocks, tid, _ = random_blocks(t, rows=n, k=k, seed=0)
        lin = CudaQuantLinear([(blocks, tid)], k, None, torch.device("cuda"), torch.bfloat16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ms = timed(lambda: lin(x))
            ms_dense = timed(lambda: x @ dense.T)
            gbs, gbs_dense = blocks.numel() / ms / 1e6, dense.numel() * 2 / ms_dense / 1e6
            rows.append(dict(matrix=name, type=t, rows=n, cols=k, m=m, ms=ms, gbs=gbs, ms_bf16=ms_dense,
                             gbs_bf16=gbs_dense, path="gemv" if m <= tilelang_ops.GEMV_ROWS else "decode+cuBLAS"))
            print(f"{name:16} {t:5} {m:3d} {ms:10.4f} {gbs:7.0f} {ms_dense:9.4f} {gbs_dense:7.0f} {ms_dense / ms:7.2f}",
                  flush=True)
        del lin, dense
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(card=card, date=str(date.today()), calls_per_graph=CALLS, results=rows), indent=1))
    print(f"wrote {a.out} ({card})")


if __name__ == "__main__":
    main()
