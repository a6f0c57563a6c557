"""Server-style batches on one GPU (issue 14 item 3): `BatchCache` (one dense cache per row, rows at
their own lengths: 300, 397, 494, ... tokens) through `decode.step`, the step replayed as one CUDA graph
against the same step op by op; batch 1, 4 and 8. A random Q4_K_M-like file with Llama-3.1-8B's layer
shapes and 4 layers (written to /tmp, ~10 s), greedy, 32 timed steps after 4.

    python bench/batch_gpu.py
"""
import sys, time
import torch

if __name__ == "__main__":
    sys.path.insert(0, "bench")
    from pathlib import Path
    import leank
    import e2e_gpu as e
    from leank.convert.synthetic import TinySpec, write_tiny_model
    from leank.kernels import tilelang_ops as tlo
    from leank.runtime import decode, graph
    from leank.runtime.server.slots import BatchCache
    t0 = time.time()
    path = write_tiny_model(Path("/tmp/l8b-4layers.gguf"), TinySpec(**{**e.LLAMA31_8B, **e.WEIGHTS["q4_k_m"], "n_layers": 4}))
    m = leank.load(path, device="cuda", dtype=torch.bfloat16)
    dt = torch.bfloat16
    specs = tlo.gemv_specs(["Q4_K", "Q6_K"], dt) + tlo.step_specs(dt, False)
    for ps in (False, True):
        specs += tlo.decode_specs(128, 4, dt, [], 16, 16, 1, ps)
    tlo.precompile(specs)
    print(f"ready {time.time() - t0:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(0)
    for B in (1, 4, 8):
        for mode in ("graph", "eager"):
            caches = [m.new_cache(capacity=2048) for _ in range(B)]
            for i, c in enumerate(caches):
                decode.prefill(m.transformer, c, torch.randint(0, 128000, (1, 300 + 97 * i), generator=gen))
            batch = BatchCache(caches)
            if mode == "eager":
                graph._STEPS[batch] = False
            tokens = torch.randint(0, 128000, (B,), generator=gen)
            for i in range(36):
                if i == 4:
                    torch.cuda.synchronize(); t1 = time.time()
                tokens = decode.step(m.transformer, batch, tokens).argmax(-1)
            dt_ = (time.time() - t1) / 32
            st = graph._STEPS.get(batch)
            print(f"B={B} {mode}: {1000 * dt_:.2f} ms a step, {B / dt_:.0f} tok/s, captures {getattr(st, 'captures', 0)}", flush=True)
    print(f"end {time.time() - t0:.0f} s")
