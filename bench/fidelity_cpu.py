"""Perplexity of one text under leank and llama.cpp on the same GGUF file (CPU).

    python bench/fidelity_cpu.py --model ~/.cache/leank/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --tokens 512

leank twice: teacher-forced in one pass (a prompt: ggml's tiled matrix kernels with 8-bit activations, or
without ggml matrices decoded to float32 for BLAS) and with every token after the first --decode-from fed
one at a time (the decode path: ggml's one-row kernels, or leank's C kernels); llama.cpp teacher-forced (its logits_all), f16 cache. Text:
tests/data/prose.txt, repeated if needed. Prints the three perplexities and leank's relative
differences. tests/test_fidelity.py asserts the 1 % on the default model; this is for the others.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

PROSE = Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode-from", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without weight repacking / AMX "
                    "(its AMX product segfaults on some VMs; see bench/decode_cpu.py)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import llama_cpp
    from decode_cpu import turn_off_extra_bufts  # bench/ is the script's folder: sys.path[0]

    import leank
    from leank.kernels import ggml_cpu

    m = leank.load(a.model, device="cpu")
    text = PROSE.read_text()
    while len(ids := m.tokenize(text)) < a.tokens:
        text += "\n\n" + PROSE.read_text()
    ids = ids[: a.tokens]
    ours = m.perplexity(ids)["perplexity"]
    ours_decode = m.perplexity(ids, decode_from=a.decode_from)["perplexity"]
    if a.no_extra_bufts:
        turn_off_extra_bufts()
    llm = llama_cpp.Llama(str(m.path), n_ctx=a.tokens + 8, logits_all=True, verbose=False, n_threads=a.threads)
    llm.eval(ids)
    logits = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    theirs = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    print(f"model {m.path.name}, {len(ids)} tokens, matrices: {ggml_cpu.matmul_path()}")
    print(f"| llama.cpp (f16 cache) | {theirs:.4f} | - |")
    print(f"| leank, one pass | {ours:.4f} | {(ours - theirs) / theirs:+.2%} |")
    print(f"| leank, decoded one token at a time after {a.decode_from} | {ours_decode:.4f} | {(ours_decode - theirs) / theirs:+.2%} |")


if __name__ == "__main__":
    main()
