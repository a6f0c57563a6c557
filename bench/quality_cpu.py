"""Quality per byte on CPU (issue 17): leank's cache policies and llama.cpp's own KV quantization, each
against its own dense cache, on the same model file, text and positions.

leank: `leank.masks.evaluate.kl_divergence`: the text's first --prefix tokens prefilled, every later one
decoded through the policy's cache; per decoded position KL(dense || policy), top-1 agreement and the
NLL of the text's next token. llama.cpp (llama-cpp-python): teacher-forced logits of the whole text
(`logits_all=True`, `flash_attn=True`) with the K/V cache in q8_0 or q4_0 against the f16 cache, scored
on the same positions. Text: Python's own documentation (`pydoc_data.topics`, the text of the earlier
perplexity tables), the first --ctx tokens. Every record is appended to a JSON-lines file as soon as it
is measured; `table` prints the markdown table.

    nice -n 10 python bench/quality_cpu.py leank --policies 'leank:shipped+kivi2' --ctx 4096
    nice -n 10 python bench/quality_cpu.py llama --types q8_0 q4_0 --ctx 4096
    python bench/quality_cpu.py table

Bytes: leank's from `nbytes()` at the end of the text, with the full region (sink + recent) counted at
2 bytes a value as on a GPU (this CPU computes it in float32); llama.cpp's from the GGML block sizes
(q4_0: 18 bytes per 32 values, q8_0: 34, f16: 2 a value), every token stored at that type.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path("bench/quality_cpu.jsonl")
LLAMA_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}  # llama.cpp's --cache-type -> GGMLQuantizationType


def offline_text() -> str:
    """Plain English technical prose that every Python installation carries (as bench/eval_cpu.py)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _where() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine()}


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _tokens(tokenizer, ctx: int, prefix: int) -> list[int]:
    """The text's first `ctx` tokens (`tokenizer`: a leank Model or Tokenizer, llama.cpp's either way)."""
    ids = tokenizer.tokenize(offline_text())[:ctx]
    if len(ids) < ctx:
        raise SystemExit(f"the text has only {len(ids)} tokens, fewer than --ctx {ctx}")
    if not 1 <= prefix <= ctx - 2:
        raise SystemExit(f"--prefix must be from 1 to --ctx - 2 ({ctx - 2}), got {prefix}")
    return ids


def leank_run(args) -> None:
    import torch

    import leank
    from leank.masks.choose import parse_policies
    from leank.masks.evaluate import kl_divergence
    from leank.runtime.cache.base import kv_dtype

    torch.set_num_threads(args.threads)
    model = leank.load(args.model, device="cpu")
    ids = _tokens(model, args.ctx, args.prefix)
    policies = parse_policies(args.policies, model)
    # the full region's element size as stored here (float16 for a float32 model on a CPU: `kv_dtype`)
    elt = torch.finfo(kv_dtype(model.device, model.dtype)).bits // 8
    # one pass for every policy: the prefill (and the dense reference) is shared, the decode is per policy
    t0 = time.perf_counter()
    results = kl_divergence(model, ids, policies, decode_from=args.prefix, reference=args.reference)
    seconds = time.perf_counter() - t0
    for spec, policy in policies.items():
        r = results[spec]
        c = r["cache"]
        middle = c["middle_k"] + c["middle_v"] + c["scales"]
        a = model.args
        fp16_per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2
        record = {"kind": "leank", "policy": spec, "settings": policy.as_dict(), "model": str(model.path),
                  "text": "pydoc_data.topics", **{k: v for k, v in r.items() if k != "cache"}, "cache": c,
                  "middle_tokens": c["middle_tokens"],
                  "middle_ratio": fp16_per_token * c["middle_tokens"] / middle if middle else None,
                  "bytes_per_token_fp16_full": (c["full"] * 2 / elt + middle) / c["tokens"],
                  "fp16_bytes_per_token": fp16_per_token, "threads": args.threads,
                  "seconds": round(seconds, 1), "policies_in_run": len(policies), **_where()}
        _append(args.out, record)
        print(spec, {k: record[k] for k in ("kld_mean", "kld_p99", "top1_agreement", "decode_perplexity",
                                            "dense_decode_perplexity", "middle_ratio", "bytes_per_token_fp16_full",
                                            "seconds")}, flush=True)


def llama_run(args) -> None:
    import gc

    import llama_cpp
    import numpy as np
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from leank.masks.evaluate import divergence_stats, summarize_divergence
    from leank.runtime.engine import open_header
    from leank.runtime.text.tokenizer import Tokenizer

    header = open_header(args.model)
    a = header.args
    path = str(header.path)
    # the tokens leank scores (leank's tokenizer is llama.cpp's)
    ids = _tokens(Tokenizer(path), args.ctx, args.prefix)
    batch = 512

    def logits(type_name: str) -> tuple[torch.Tensor, float]:
        """Teacher-forced logits of positions --prefix .. ctx-2 only: llama.cpp's `logits_all` would keep
        a row for every position (16K x 152K floats = 10 GB on Qwen2.5), so the batches ask for rows
        themselves, only where scored positions are."""
        t0 = time.perf_counter()
        ggml = int(GGMLQuantizationType[LLAMA_TYPES[type_name]])
        llm = llama_cpp.Llama(path, n_ctx=len(ids), n_batch=batch, n_ubatch=batch, logits_all=False, flash_attn=True,
                              type_k=ggml, type_v=ggml, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False)
        vocab, fed, rows = llm.n_vocab(), ids[:-1], []
        for i in range(0, len(fed), batch):
            part = fed[i : i + batch]
            want = i + len(part) > args.prefix
            llm._batch.set_batch(batch=part, n_past=i, logits_all=want)
            llm._ctx.decode(llm._batch)
            if want:
                out = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(part), vocab))
                rows.append(torch.from_numpy(out[max(0, args.prefix - i) :].copy()))
        del llm
        gc.collect()
        out = torch.cat(rows)
        assert out.shape[0] == len(ids) - 1 - args.prefix
        return out, time.perf_counter() - t0

    ref, ref_s = logits("f16")
    targets = torch.tensor(ids[args.prefix + 1 :])
    ref_nll = divergence_stats(ref, ref, targets)["nll"]
    elems = 2 * a.n_layers * a.n_kv_heads * a.head_dim
    for type_name in args.types:
        rows, seconds = logits(type_name)
        kld, top1, nll = [], [], []
        for i in range(0, rows.shape[0], 256):  # bounded float64 temporaries
            d = divergence_stats(ref[i : i + 256], rows[i : i + 256], targets[i : i + 256])
            kld.append(d["kld"]), top1.append(d["top1"]), nll.append(d["nll"])
        s = summarize_divergence(torch.cat(kld), torch.cat(top1), torch.cat(nll))
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[LLAMA_TYPES[type_name]]]
        record = {"kind": "llama.cpp", "policy": f"llama.cpp {type_name}", "model": path, "text": "pydoc_data.topics",
                  "tokens": len(ids), "prefix": args.prefix, **s,
                  "dense_decode_perplexity": float(torch.exp(ref_nll.double().mean())),
                  "bytes_per_token": elems * size / block, "fp16_bytes_per_token": elems * 2,
                  "llama_cpp": llama_cpp.__version__, "threads": args.threads,
                  "seconds": round(seconds + ref_s, 1), **_where()}
        _append(args.out, record)
        print(record["policy"], {k: record[k] for k in ("kld_mean", "kld_p99", "top1_agreement", "decode_perplexity",
                                                        "dense_decode_perplexity", "bytes_per_token")}, flush=True)


def _default_window_ratio(spec: str, header, ctx: int) -> float:
    """x smaller than fp16 for the whole cache at `ctx` tokens under `spec` with the model's default sink
    and recent window, the full region at 2 bytes a value (`planned_nbytes`: what `nbytes()` reports)."""
    from leank.masks.choose import parse_policy
    from leank.runtime.cache.plan import kv_summary

    base = ",".join(o for o in spec.split(",") if not o.startswith(("sink=", "recent=")))
    return kv_summary(parse_policy(base, header), header.args, ctx)["ratio_vs_fp16"]


def table(args) -> None:
    from leank.runtime.engine import open_header

    records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    if args.model:  # table --model FILE: that model's records only
        records = [r for r in records if Path(r["model"]).name == Path(args.model).name]
    headers = {}
    print(f"| model | cache | tokens | bytes/token | x smaller than fp16 | middle x smaller | whole cache x smaller at "
          f"{args.ctx} (default window) | mean KLD | KLD p99 | top-1 = dense | decode ppl | dense ppl | vs dense |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        bpt = r.get("bytes_per_token") or r["bytes_per_token_fp16_full"]
        mid = f"{r['middle_ratio']:.2f}" if r.get("middle_ratio") else "-"
        if r["kind"] == "leank":
            header = headers.setdefault(r["model"], open_header(r["model"]))
            at_ctx = f"{_default_window_ratio(r['policy'], header, args.ctx):.2f}"
        else:
            at_ctx = f"{r['fp16_bytes_per_token'] / bpt:.2f}"
        rel = 100 * (r["decode_perplexity"] / r["dense_decode_perplexity"] - 1)
        print(f"| {Path(r['model']).name.removesuffix('.gguf')} | {r['policy']} | {r['tokens']} | {bpt:.0f} | "
              f"{r['fp16_bytes_per_token'] / bpt:.2f} | {mid} | {at_ctx} | {r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | "
              f"{r['kld_p99']:.3f} | {r['top1_agreement']:.3f} | {r['decode_perplexity']:.3f} | "
              f"{r['dense_decode_perplexity']:.3f} | {rel:+.2f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["leank", "llama", "table"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--policies", nargs="+", default=["kivi2"])
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"], choices=["q8_0", "q4_0"])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--reference", default="prefill", choices=["prefill", "decode"],
                    help="dense logits from one pass (default, the same function) or a lockstep dense decode")
    ap.add_argument("--threads", type=int, default=1, help="1: on this loaded 2-core VM 2 threads ran 5-10x slower")
    args = ap.parse_args()
    {"leank": leank_run, "llama": llama_run, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
