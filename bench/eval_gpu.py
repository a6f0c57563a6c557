"""Issue 5's quality grid on the GPU machine: retrieval accuracy and decode perplexity of dense, learned,
calibration and frequency masks at ratios 0.5 and 0.7, each alone and with KIVI-4 and KIVI-2.

The GPU machine has no llama-cpp-python (leank's tokenizer), so the work is split in three steps:

    # 1. here (CPU, with llama-cpp): held-out prompts as token ids, the vocabulary's byte pieces, the text
    python bench/eval_gpu.py prepare --out .xfer/eval-input.json --masks-dir .xfer
    # 2. on the GPU machine: every (task, length) job and every perplexity policy, over parallel workers
    python bench/eval_gpu.py run --input .xfer/eval-input.json --model /tmp/smol.gguf --out $OUT --workers 12
    # 3. here: the markdown tables of bench/RESULTS.md
    python bench/eval_gpu.py table --results DIR

Step 2 uses the very code `leank eval` runs (`run_sample`, `decode_perplexity`); only the tokenizer is
replaced, by a table of each token's bytes taken from llama.cpp in step 1 (leank's `detokenize` is the
concatenation of those pieces, so replies are the same text). Each finished job is written at once, so a run
stopped by its time limit keeps what it measured; `--skip-done DIR` resumes in a later run.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

TASKS = ["passkey", "multikey", "multivalue"]
LENGTHS = [2048, 4096, 7168]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
MASK_FILES = {  # name in the tables -> file (learned ones ship with leank; calib ones are made by `prepare`)
    "learned0.7": "masks/data/smollm2-135m-instruct-r0.7.safetensors",
    "learned0.5": "masks/data/smollm2-135m-instruct-r0.5.safetensors",
    "calib0.7": "calib-0.7.safetensors",
    "calib0.5": "calib-0.5.safetensors",
    "learned0.7b": "r0.7-l0.1.safetensors",  # a second 0.7 training, lambda 0.1 (used when present)
}


def policy_specs(masks_dir: str) -> dict[str, str]:
    """Table name -> `leank eval` policy SPEC, 21 of them."""
    masks = {}
    for name, f in MASK_FILES.items():
        masks[name] = f if f.startswith("masks/") else str(Path(masks_dir) / f)
    masks["freq0.7"], masks["freq0.5"] = "freq:0.7", "freq:0.5"
    specs = {"dense": "dense", "kivi4": "kivi4", "kivi2": "kivi2"}
    names = ["learned0.7", "calib0.7", "freq0.7", "learned0.5", "calib0.5", "freq0.5"]
    if Path(masks["learned0.7b"]).exists():
        names.insert(1, "learned0.7b")
    for name in names:
        specs[name] = f"leank:{masks[name]}"
        specs[f"{name}+kivi4"] = f"leank:{masks[name]}+kivi4"
        specs[f"{name}+kivi2"] = f"leank:{masks[name]}+kivi2"
    return specs


class PieceTokenizer:
    """What `run_sample` needs of a tokenizer, from a table of token bytes (no llama.cpp)."""

    def __init__(self, pieces: list[bytes], eog_ids):
        self.pieces, self.eog_ids = pieces, frozenset(eog_ids)

    def detokenize(self, ids, special: bool = False) -> str:  # noqa: ARG002 - same signature as Tokenizer's
        return b"".join(self.pieces[int(t)] for t in ids).decode("utf-8", errors="replace")


def prepare(args) -> None:
    import dataclasses

    import leank
    from leank.masks.tasks import make_samples

    sys.path.insert(0, str(Path(__file__).parent))
    from eval_cpu import offline_text

    model = leank.load(args.model, device="cpu")
    tok = model.tokenizer
    pieces = [tok.piece(t) for t in range(tok.n_vocab)]
    samples = list(make_samples(model, TASKS, LENGTHS, DEPTHS, args.samples, seed=args.seed, split="eval"))
    table = PieceTokenizer(pieces, tok.eog_ids)
    for s in samples[:: max(1, len(samples) // 8)]:  # the table detokenizes exactly as llama.cpp does
        assert table.detokenize(s.prompt_ids) == tok.detokenize(s.prompt_ids)
    for name in ("calib0.7", "calib0.5"):
        path = Path(args.masks_dir) / MASK_FILES[name]
        if not path.exists():
            ratio = name.removeprefix("calib")
            subprocess.run([sys.executable, "-m", "leank.cli", "--threads", "1", "mask", "make", f"calib:{ratio}",
                            "-o", str(path), "--align", "16"], check=True)
    out = {"model": str(model.path), "seed": args.seed, "samples_per_depth": args.samples,
           "eog_ids": sorted(tok.eog_ids), "pieces": [base64.b64encode(p).decode() for p in pieces],
           "samples": [dataclasses.asdict(s) for s in samples],
           "ppl_ids": model.tokenize(offline_text())[: args.ppl_ctx], "ppl_prefix": args.ppl_prefix}
    args.out.write_text(json.dumps(out))
    print(f"{len(samples)} samples, {len(out['ppl_ids'])} perplexity tokens -> {args.out}")


def _jobs(specs: dict[str, str], samples: list, args) -> list[tuple]:
    """Perplexity policies first (the longest jobs), then retrieval one sample a job, longest prompts first."""
    jobs = [] if args.no_ppl else [("ppl", name) for name in specs]
    if not args.no_retrieval:
        for length in sorted(args.lengths, reverse=True):
            for task in args.tasks:
                mine = [i for i, s in enumerate(samples) if s.task == task and s.length == length]
                jobs += [("retrieval", task, length, i) for i in mine[:: args.stride]]
    return jobs


def _specs(args) -> dict[str, str]:
    """The 21 policies of the grid, or those named by --policy NAME=SPEC."""
    if not args.policy:
        return policy_specs(args.masks_dir)
    return dict(p.split("=", 1) for p in args.policy)


def _forward(args) -> list[str]:
    """The parent's options that the workers need."""
    out = ["--tasks", *args.tasks, "--lengths", *map(str, args.lengths), "--protocol", args.protocol,
           "--stride", str(args.stride)]
    for p in args.policy or []:
        out += ["--policy", p]
    if args.no_ppl:
        out.append("--no-ppl")
    if args.no_retrieval:
        out.append("--no-retrieval")
    if args.skip_done:
        out += ["--skip-done", str(args.skip_done)]
    return out


def _job_name(job: tuple) -> str:
    """A file name for the job (policy names have '+', which some file transfers refuse)."""
    return "-".join(str(x) for x in job).replace("+", "_")


def run(args) -> None:
    if args.worker is None:  # the parent: start the workers and wait
        procs = [subprocess.Popen([sys.executable, __file__, "run", "--input", str(args.input),
                                   *(["--model", args.model] if args.model else []),
                                   "--out", str(args.out), "--masks-dir", args.masks_dir, "--deadline", str(args.deadline),
                                   "--workers", str(args.workers), "--worker", str(i), "--device", args.device,
                                   *_forward(args)])
                 for i in range(args.workers)]
        sys.exit(max(p.wait() for p in procs))

    import torch

    import leank
    from leank.masks.evaluate import decode_perplexity, run_sample
    from leank.masks.choose import parse_policies
    from leank.masks.tasks import Sample

    torch.set_num_threads(1)
    start = time.time()
    data = json.loads(Path(args.input).read_text())
    specs = _specs(args)
    done = {p.stem for p in Path(args.skip_done).glob("*.json")} if args.skip_done else set()
    samples = [Sample(**s) for s in data["samples"]]
    todo = [j for j in _jobs(specs, samples, args) if _job_name(j) not in done]
    model = leank.load(args.model, device=args.device)
    model.__dict__["tokenizer"] = PieceTokenizer([base64.b64decode(p) for p in data["pieces"]], data["eog_ids"])
    policies = parse_policies(list(specs.values()), model)
    by_name = {name: policies[spec] for name, spec in specs.items()}
    where = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
             "device": torch.cuda.get_device_name() if model.device.type == "cuda" else _cpu_name(),
             "dtype": str(model.dtype), "torch": torch.__version__}
    claims = args.out / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    for job in todo:
        try:  # the first worker to create the claim file runs the job
            os.close(os.open(claims / _job_name(job), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if time.time() - start > args.deadline:
            print(f"worker {args.worker}: deadline, {_job_name(job)} not run", flush=True)
            continue
        t0 = time.perf_counter()
        if job[0] == "ppl":
            name = job[1]
            result = decode_perplexity(model, data["ppl_ids"], {name: by_name[name]}, decode_from=data["ppl_prefix"])
            record = {"kind": "perplexity", "policy": name, "spec": specs[name], **result[name]}
        else:
            _, task, length, i = job
            replies = run_sample(model, samples[i], by_name, protocol=args.protocol)
            record = {"kind": "retrieval", "task": task, "length": length, "index": i, "protocol": args.protocol,
                      "samples": [{**samples[i].describe(), "replies": {k: r.as_dict() for k, r in replies.items()}}]}
        record.update(where, seconds=round(time.perf_counter() - t0, 1),
                      settings={name: by_name[name].as_dict() for name in specs})
        tmp = args.out / f".{_job_name(job)}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(args.out / f"{_job_name(job)}.json")
        print(f"worker {args.worker}: {_job_name(job)} in {record['seconds']} s", flush=True)


def _cpu_name() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor()
    except OSError:
        return platform.processor()


def table(args) -> None:
    records = [json.loads(p.read_text()) for d in args.results for p in sorted(Path(d).rglob("*.json"))]
    specs = list(policy_specs("."))
    for r in records:
        specs += [p for p in r["settings"] if p not in specs]
    retrieval = [r for r in records if r["kind"] == "retrieval"]
    if retrieval:
        r0 = retrieval[0]
        print(f"retrieval: {r0['device']}, {r0['dtype']}, torch {r0['torch']}, {r0['date'][:10]}, "
              f"protocol {r0['protocol']}\n")
        cells: dict = defaultdict(lambda: defaultdict(list))
        for r in retrieval:
            for s in r["samples"]:
                for p in s["replies"]:
                    cells[(r["task"], r["length"])][p].append(s["replies"][p]["correct"])
                    cells[(r["task"], "all")][p].append(s["replies"][p]["correct"])
                    cells[("all", "all")][p].append(s["replies"][p]["correct"])
        present = [p for p in specs if any(p in c for c in cells.values())]
        for group in (present[:3], [p for p in present[3:] if "0.7" in p], [p for p in present[3:] if "0.5" in p],
                      [p for p in present[3:] if "0.7" not in p and "0.5" not in p]):
            cols = ["dense", *[p for p in group if p != "dense"]]
            if len(cols) == 1:
                continue
            print("| task | length | n | " + " | ".join(cols) + " |")
            print("|---|---:|---:|" + "---:|" * len(cols))
            order = sorted(cells, key=lambda k: (k[0] == "all", k[0], k[1] == "all", k[1] if k[1] != "all" else 0))
            for key in order:
                row = cells[key]
                n = len(row["dense"])
                print(f"| {key[0]} | {key[1]} | {n} | " + " | ".join(
                    f"{100 * sum(row[p]) / len(row[p]):.1f}" if row.get(p) else "-" for p in cols) + " |")
            print()
    ppl = {r["policy"]: r for r in records if r["kind"] == "perplexity"}
    if ppl:
        r0 = next(iter(ppl.values()))
        print(f"perplexity: {r0['device']}, {r0['dtype']}, torch {r0['torch']}, {r0['date'][:10]}\n")
        base = ppl.get("dense", {}).get("decode_perplexity")
        print("| policy | decoded tokens | decode perplexity | vs dense |\n|---|---:|---:|---:|")
        for p in specs:
            if p in ppl:
                v = ppl[p]["decode_perplexity"]
                rel = f"{100 * (v / base - 1):+.2f} %" if base else "-"
                print(f"| {p} | {ppl[p]['decoded']} | {v:.4f} | {rel} |")
    seconds = sum(r["seconds"] for r in records)
    print(f"\n{len(records)} jobs, {seconds:.0f} s of worker time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "run", "table"])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--input", type=Path)
    ap.add_argument("--masks-dir", default=".xfer", help="where the calibration masks are (made if missing)")
    ap.add_argument("--samples", type=int, default=2, help="prepare: samples per task, length and depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-ctx", type=int, default=2048)
    ap.add_argument("--ppl-prefix", type=int, default=64)
    ap.add_argument("--protocol", default="prefill", choices=["conversation", "prefill"])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=540, help="run: seconds after which no job is started")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-done", default=None, help="run: a results folder whose jobs are not run again")
    ap.add_argument("--results", nargs="+", type=Path, help="table: results folders")
    ap.add_argument("--policy", action="append", help="run: NAME=SPEC instead of the grid's policies (repeat)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    ap.add_argument("--no-ppl", action="store_true", help="run: retrieval only")
    ap.add_argument("--no-retrieval", action="store_true", help="run: perplexity only")
    ap.add_argument("--stride", type=int, default=1, help="run: every n-th sample of each task and length only")
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
