"""Decode speed for one thread setting, on a machine that may be busy (bench/RESULTS.md, "Threads on a busy
machine"). One process per setting, since OpenMP reads OMP_WAIT_POLICY when torch loads:

    OMP_WAIT_POLICY=ACTIVE python bench/threads_cpu.py 2     # 2 threads that spin while they wait
    OMP_WAIT_POLICY=PASSIVE python bench/threads_cpu.py 1
    python bench/threads_cpu.py default                      # what the CLI picks (cli.options.default_threads)

Prints one JSON line: the setting, the threads used, the load at the end and two decode rates (tok/s,
48 greedy tokens after an 8-token warm-up, default model).
"""
import os, sys, json
import torch
import leank
from leank.cli.options import default_threads
t = default_threads() if sys.argv[1] == "default" else int(sys.argv[1])
torch.set_num_threads(t)
m = leank.load(device="cpu")
ids = m.tokenize("The history of the city begins")
for step in m.stream(ids, max_tokens=8, temperature=0): pass
rates = []
for r in range(2):
    for step in m.stream(ids, max_tokens=48, temperature=0): pass
    rates.append(round(step.stats.decode_tokens_per_second, 1))
print(json.dumps({"threads": sys.argv[1], "picked": t, "omp": os.environ.get("OMP_WAIT_POLICY"), "busy": os.environ.get("BUSY"), "load": open("/proc/loadavg").read().split()[:4], "tok_s": rates}), flush=True)
