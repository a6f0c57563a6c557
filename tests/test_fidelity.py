"""leank against llama.cpp on the real default model (SmolLM2-135M-Instruct).

llama.cpp multiplies quantized weights with 8-bit-quantized activations, so the comparison is twofold:
- on a float32 re-export of the model (llama.cpp then computes in float32): logits and greedy tokens;
- on the original Q4_1 file: perplexity.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import leank
from leank.convert.writer import write_float32_copy

llama_cpp = pytest.importorskip("llama_cpp")

PROSE = Path(__file__).parent / "data" / "prose.txt"  # our own English prose, about 800 tokens


def corpus() -> str:
    return PROSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def f32_path(default_model_path, tmp_path_factory):
    return write_float32_copy(default_model_path, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


@pytest.fixture(scope="module")
def f32_pair(f32_path):
    ours = leank.load(f32_path, device="cpu", dtype="float32")
    ref = llama_cpp.Llama(str(f32_path), n_ctx=2048, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0, flash_attn=False)
    yield ours, ref
    ref.close()


def test_logits_agree_with_llama_cpp_in_float32(f32_pair):
    ours, ref = f32_pair
    ids = ours.tokenize(corpus())[:600]
    assert len(ids) >= 512
    a = ours.logits(ids).double()
    ref.reset()
    ref.eval(ids)
    b = torch.tensor(np.array(ref.scores[: len(ids)]), dtype=torch.float64)
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    print(f"top-1 agreement {top1:.4f}, mean KL(llama.cpp || leank) {kl:.2e} nats over {len(ids)} tokens")
    assert top1 >= 0.995
    assert kl <= 1e-3


@pytest.mark.parametrize("prompt", ["The three primary colors are", "def fibonacci(n):\n    "])
def test_greedy_tokens_identical_to_llama_cpp(f32_pair, prompt):
    ours, ref = f32_pair
    ids = ours.tokenize(prompt)
    mine = [s.token for s in ours.stream(ids, max_tokens=64, temperature=0) if s.token is not None]
    theirs = []
    ref.reset()
    ref.eval(ids)
    for _ in range(len(mine)):
        token = int(np.argmax(ref.scores[ref.n_tokens - 1]))
        theirs.append(token)
        ref.eval([token])
    assert len(mine) == 64, "64 tokens without an end-of-generation token"
    assert mine == theirs


def llama_cpp_perplexity(path, ids) -> float:
    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    logits = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    llm.close()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def test_perplexity_on_q4_1_within_one_percent_of_llama_cpp(default_model, default_model_path):
    ids = default_model.tokenize(corpus())[:512]
    ours = default_model.perplexity(ids)["perplexity"]
    theirs = llama_cpp_perplexity(default_model_path, ids)
    print(f"perplexity leank {ours:.4f}, llama.cpp {theirs:.4f}")
    assert abs(ours - theirs) / theirs <= 0.01
