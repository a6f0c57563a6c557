"""One compressed decode-attention case on the GPU, called in a loop: the target for `ncu`.

Llama-3.1-8B's layer shape with the released LeanK mask's typical layer (as `attention_gpu.py`), one
method, batch and context. Compiles (or loads) its kernels, checks one call against the torch reference
on a small slice, then calls the kernels --calls times.

    ncu --clock-control none -k regex:main -s 20 -c 4 --set full -o middle python3 bench/profile_gpu.py
    python3 bench/profile_gpu.py --method LeanK+KIVI-2 --batch 64 --context 32768 --calls 30
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def main() -> None:
    import attention_gpu as ag  # bench/ is on sys.path when this file runs as a script

    from leank.kernels import tilelang_ops as tlo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, default=ag.DEFAULT_MASK)
    ap.add_argument("--method", default="LeanK+KIVI-2", choices=list(ag.METHODS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--dump-source", type=Path, default=None, help="write each compiled kernel's CUDA source here")
    a = ap.parse_args()
    pruned, kb, vb = ag.METHODS[a.method]
    kept_all = torch.load(a.mask, weights_only=True) > 0.5
    kept = kept_all[ag.typical_layer(kept_all)]
    if not pruned:
        kept = torch.ones_like(kept)
    t0 = time.time()
    tlo.precompile(tlo.decode_specs(ag.D, ag.HQ // ag.HKV, ag.DTYPE, kept.sum(-1).tolist(), kb, vb, ag.GROUP))
    print(f"kernels ready in {time.time() - t0:.1f} s; kept counts {kept.sum(-1).tolist()}")
    if a.dump_source:
        a.dump_source.mkdir(parents=True, exist_ok=True)
        for i, (spec, k) in enumerate(tlo._KERNELS.items()):
            name = "-".join(str(x) for x in spec)[:120].replace("/", "_").replace(" ", "")
            (a.dump_source / f"{i:02d}-{name}.cu").write_text(f"// {spec}\n" + k.get_kernel_source())
    gen = torch.Generator(device="cuda").manual_seed(0)
    full_k, full_v, groups, M, nbytes = ag.make_layer(kept, a.batch, a.context, kb, vb, gen)
    q = ag.rand((a.batch, ag.HQ, 1, ag.D), ag.DTYPE, gen)
    scale = 1 / math.sqrt(ag.D)
    ops = tlo.ops()

    def call():
        return ops.compressed_attention(q, full_k, full_v, groups, M, kb, vb, ag.GROUP, scale)

    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.calls):
        call()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / a.calls * 1e3
    print(f"{a.method} B{a.batch} ctx {a.context}: {ms:.3f} ms per call (wall, {a.calls} calls), "
          f"{nbytes / 1e6:.0f} MB read, {nbytes / ms / 1e6:.0f} GB/s")


if __name__ == "__main__":  # precompile uses a process pool: the guard keeps its children from re-running main
    main()
