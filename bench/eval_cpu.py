"""Reproduce the "Quality on CPU (issue 3)" tables of bench/RESULTS.md.

Retrieval: every sample's result is appended to a JSON-lines file as soon as it is done (a long run that
is stopped keeps what it measured), samples interleaved so that each (task, length) gets its first
sample before any gets its second. Perplexity: decode perplexity per policy on offline text (Python's
own documentation, `pydoc_data.topics`). `--table` prints the markdown tables from the file.

    nice -n 10 python bench/eval_cpu.py retrieval --out bench/eval_cpu.jsonl --samples 3
    nice -n 10 python bench/eval_cpu.py perplexity --out bench/eval_cpu.jsonl --ctx 2048
    python bench/eval_cpu.py table --out bench/eval_cpu.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

POLICIES = ["dense", "kivi4", "kivi2", "leank:freq:0.5+kivi4"]
PPL_POLICIES = ["dense", "kivi4", "kivi2"]


def offline_text() -> str:
    """Plain English technical prose that every Python installation carries."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def retrieval(args) -> None:
    import torch

    import leank
    from leank.masks.choose import parse_policies
    from leank.masks.evaluate import run_sample
    from leank.masks.tasks import make_sample

    torch.set_num_threads(args.threads)
    model = leank.load(args.model, device="cpu")
    policies = parse_policies(args.policies, model, **_shared(args))
    for i in range(args.first, args.first + args.samples):
        for length in args.lengths:
            for task in args.tasks:
                depth = args.depths[i % len(args.depths)]
                s = make_sample(model, task, length, depth, seed=args.seed, index=i)
                t0 = time.perf_counter()
                replies = run_sample(model, s, policies, args.protocol)
                record = {"kind": "retrieval", **s.describe(), "index": i, "protocol": args.protocol, "seconds": round(time.perf_counter() - t0, 1),
                          "replies": {k: r.as_dict() for k, r in replies.items()},
                          "policies": {k: p.as_dict() for k, p in policies.items()}, **_where()}
                _append(args.out, record)
                print(task, length, depth, {k: (r.text, r.correct) for k, r in replies.items()},
                      f"{record['seconds']}s", flush=True)


def perplexity(args) -> None:
    import torch

    import leank
    from leank.masks.evaluate import decode_perplexity
    from leank.masks.choose import parse_policies

    torch.set_num_threads(args.threads)
    model = leank.load(args.model, device="cpu")
    ids = model.tokenize(offline_text())[: args.ctx]
    for spec in args.policies:
        policies = parse_policies([spec], model, **_shared(args))
        t0 = time.perf_counter()
        result = decode_perplexity(model, ids, policies, decode_from=args.prefix)[spec]
        record = {"kind": "perplexity", "policy": spec, "text": "pydoc_data.topics", "prefix": args.prefix,
                  **result, "seconds": round(time.perf_counter() - t0, 1), "settings": policies[spec].as_dict(),
                  **_where()}
        _append(args.out, record)
        print(spec, round(result["perplexity"], 4), "decode-only", round(result["decode_perplexity"], 4),
              f"{record['seconds']}s", flush=True)


def _shared(args) -> dict:
    return {"sink_tokens": args.sink, "recent_tokens": args.recent, "group_size": args.group}


def _where() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine()}


def table(args) -> None:
    records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    acc: dict = defaultdict(lambda: defaultdict(list))
    policies: list[str] = []
    for r in records:
        if r["kind"] != "retrieval":
            continue
        for p, reply in r["replies"].items():
            if p not in policies:
                policies.append(p)
            acc[(r["task"], r["length"])][p].append(reply["correct"])
    print("| task | length | n | " + " | ".join(policies) + " |")
    print("|---|---:|---:|" + "---:|" * len(policies))
    for (task, length), cells in sorted(acc.items()):
        n = max(len(v) for v in cells.values())
        row = [f"{100 * sum(cells[p]) / len(cells[p]):.0f}" if cells.get(p) else "-" for p in policies]
        print(f"| {task} | {length} | {n} | " + " | ".join(row) + " |")
    # a finer measure than accuracy where dense itself fails: how often a policy's reply is dense's, verbatim
    same: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] == "retrieval" and "dense" in r["replies"]:
            for p, reply in r["replies"].items():
                same[r["task"]][p].append(reply["reply"] == r["replies"]["dense"]["reply"])
    if same:
        print("\n| task | n | " + " | ".join(f"{p} = dense" for p in policies) + " |")
        print("|---|---:|" + "---:|" * len(policies))
        for task, cells in sorted(same.items()):
            n = len(cells["dense"])
            print(f"| {task} | {n} | " + " | ".join(f"{100 * sum(cells[p]) / len(cells[p]):.0f}" for p in policies) + " |")
    ppl = [r for r in records if r["kind"] == "perplexity"]
    if ppl:
        base = next((r["perplexity"] for r in ppl if r["policy"] == "dense"), None)
        print("\n| policy | tokens | decode perplexity | vs dense |\n|---|---:|---:|---:|")
        for r in ppl:
            rel = f"{100 * (r['perplexity'] / base - 1):+.2f} %" if base else "-"
            print(f"| {r['policy']} | {r['tokens']} | {r['perplexity']:.4f} | {rel} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["retrieval", "perplexity", "table"])
    ap.add_argument("--out", type=Path, default=Path("bench/eval_cpu.jsonl"))
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 7168])
    ap.add_argument("--depths", nargs="+", type=float, default=[0.5, 0.25, 0.75],
                    help="sample i uses depths[i %% len(depths)]")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--first", type=int, default=0, help="first sample index (to extend an earlier run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", nargs="+", default=None)
    ap.add_argument("--sink", type=int, default=None)
    ap.add_argument("--recent", type=int, default=None)
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=2048, help="perplexity: tokens scored")
    ap.add_argument("--prefix", type=int, default=64, help="perplexity: tokens prefilled before decoding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--protocol", default="conversation", choices=["conversation", "prefill"])
    args = ap.parse_args()
    if args.policies is None:
        args.policies = PPL_POLICIES if args.what == "perplexity" else POLICIES
    {"retrieval": retrieval, "perplexity": perplexity, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
