"""Compare cache policies on synthetic long-context tasks (`leank.masks.tasks`) and by decode perplexity.

Protocol, per sample:
1. the context (chat prefix, instruction, document) is prefilled once into a dense cache: prefill
   attention is dense under every policy, so one prefill serves them all;
2. for each policy the dense cache is converted with `compress_cache(dense, policy, model.args)` (a dense
   policy uses the dense cache itself, rewound afterwards);
3. the question (end of the user turn, assistant header, first words of the answer) is fed as a second
   chunk: it attends to the compressed past, as in a conversation whose document came earlier;
4. the answer is greedy-decoded one token at a time through the decode path, at most
   `max_new_tokens(sample)` tokens (the expected answer's and some room), stopping at an
   end-of-generation token and, for single-answer tasks, at the end of the reply's first line with a
   letter or digit in it (lists of answers may run over several lines);
5. the reply is scored: `score` is the fraction of expected strings found in it as whole words (a
   5-digit pass key inside a longer number does not count), `correct` is all of them found. Multi-value
   and variable tracking thus get partial credit in `score` and exact match in `correct`.
Accuracy in tables is the mean of `correct` over samples, in percent.

`protocol="prefill"` is LeanK's and RULER's setting instead of steps 1-3: context and question are
prefilled together (densely) and then compressed, so only the decoded answer sees the compressed cache.
The default ("conversation") is the harsher one: the question's own queries meet the compressed past.

Decode perplexity (`decode_perplexity`): `Model.perplexity(ids, decode_from=n, policy=...)` per policy,
the first n tokens prefilled and every later token fed through the decode path, so that tokens leave
the recent window and are compressed as in generation.

KL divergence (`kl_divergence`), llama.cpp's `--kl-divergence` over the decode path: the text's first n
tokens are prefilled once (densely, as every policy prefills), then every later token is fed one at a
time to a dense cache and to each policy's cache in lockstep. At each decoded position the policy's
next-token distribution is compared with dense's: KL(dense || policy) in nats, whether the two agree on
the most likely token, and the policy's own NLL of the text's next token (its decode perplexity, on the
same positions). Same text, same positions, same reference for every policy.

Policies are named by a SPEC (`leank.masks.choose.parse_policy`), the same on the command line and in Python.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from leank.errors import LeankError
from leank.masks.tasks import Sample
from leank.runtime.cache.compressed import compress_cache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.decode import Decode, step

EXTRA_ANSWER_TOKENS = 8  # decoded beyond the expected answer's length, room for a differently worded reply
EXTRA_LIST_TOKENS = 4  # more per further answer: a list may be numbered, one answer a line


# --- scoring ----------------------------------------------------------------------------------------------
def found(answer: str, reply: str) -> bool:
    """`answer` appears in `reply` as a whole word (not inside a longer number, name or UUID)."""
    return re.search(rf"(?<![\w-]){re.escape(answer)}(?![\w-])", reply) is not None


def score_reply(reply: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` found in `reply`."""
    return sum(found(a, reply) for a in answers) / len(answers)


# --- running ----------------------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str
    tokens: int
    score: float
    correct: bool
    seconds: float
    middle_tokens: int  # tokens of the context held in the compressed middle region

    def as_dict(self) -> dict:
        return {"reply": self.text, "tokens": self.tokens, "score": self.score, "correct": self.correct,
                "seconds": round(self.seconds, 3), "middle_tokens": self.middle_tokens}


def max_new_tokens(sample: Sample) -> int:
    """The most tokens decoded for a reply: the expected answer's, and room for other wordings."""
    return len(sample.answer_ids) + EXTRA_ANSWER_TOKENS + EXTRA_LIST_TOKENS * (len(sample.answers) - 1)


@torch.inference_mode()
def _answer(model, cache, sample: Sample, logits: torch.Tensor | None = None) -> tuple[str, int]:
    """Feed the question (unless `logits` say it was prefilled), then greedy-decode the reply."""
    tok = model.tokenizer
    single = len(sample.answers) == 1  # one answer ends with its line; lists may run over several
    run = Decode(model.transformer, cache, [] if logits is not None else sample.question_ids,
                 lambda row: int(torch.argmax(row)), max_tokens=max_new_tokens(sample),
                 context_length=model.args.context_length, eog_ids=tok.eog_ids, logits=logits)
    generated: list[int] = []
    text = ""
    for token in run:
        generated.append(token)
        text = tok.detokenize(generated)
        if single and "\n" in text.strip() and re.search(r"\w", text):  # a line with content ended
            break
    text = text.strip()
    return (text.split("\n")[0] if single else text), len(generated)


PROTOCOLS = ("conversation", "prefill")


@torch.inference_mode()
def run_sample(model, sample: Sample, policies: dict[str, CachePolicy], protocol: str = "conversation",
               on_policy: Callable[[str], None] | None = None) -> dict[str, Reply]:
    """Every policy's reply to `sample` (the protocol in the module docstring).

    protocol="prefill" is LeanK's and RULER's setting instead: context and question are prefilled
    together (densely), so only the decoded answer attends to the compressed cache.
    """
    if protocol not in PROTOCOLS:
        raise LeankError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    prompt = sample.context_ids if protocol == "conversation" else sample.prompt_ids
    n = len(prompt)
    a = model.args
    dense = DenseCache(a.n_layers, a.n_kv_heads, a.head_dim, device=model.device, dtype=model.dtype,
                       capacity=sample.prompt_tokens + max_new_tokens(sample))
    first = model.transformer(torch.tensor([prompt], dtype=torch.long, device=model.device), dense,
                              logits_for="last")[0, -1]
    out: dict[str, Reply] = {}
    for name, policy in policies.items():
        t0 = time.perf_counter()
        cache = dense if policy.is_dense else compress_cache(dense, policy, a)
        middle = 0 if policy.is_dense else cache.nbytes().extra.get("middle_tokens", 0)
        text, count = _answer(model, cache, sample, None if protocol == "conversation" else first)
        if cache is dense:
            dense.truncate(n)
        score = score_reply(text, sample.answers)
        out[name] = Reply(text, count, score, score == 1.0, time.perf_counter() - t0, middle)
        if on_policy:
            on_policy(name)
    return out


def check_policies(policies: dict[str, CachePolicy], model) -> None:
    """Raise before any work for a policy the model cannot run."""
    a = model.args
    if not policies:
        raise LeankError("no cache policy to evaluate")
    for name, p in policies.items():
        try:
            p.validate(a.n_layers, a.n_kv_heads, a.head_dim, a.context_length)
        except LeankError as e:
            raise LeankError(f"policy {name!r}: {e}") from None


def evaluate(model, samples: Sequence[Sample], policies: dict[str, CachePolicy], protocol: str = "conversation",
             progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Run every sample under every policy; one record per sample (its description and each reply).

    `progress(done, total, what)` is called after each (sample, policy) pair.
    """
    check_policies(policies, model)
    total = len(samples) * len(policies)
    done = 0
    records = []
    for sample in samples:
        def tick(name: str, sample=sample) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, f"{sample.task} {sample.length} @{sample.depth:g} {name}")

        replies = run_sample(model, sample, policies, protocol, on_policy=tick)
        records.append({**sample.describe(), "replies": {k: r.as_dict() for k, r in replies.items()}})
    return records


def summarize(records: Sequence[dict], policies: Sequence[str]) -> list[dict]:
    """One row per (task, length): samples, and per policy accuracy (% exact) and mean score (%)."""
    rows: dict[tuple[str, int], dict] = {}
    for r in records:
        row = rows.setdefault((r["task"], r["length"]), {"task": r["task"], "length": r["length"], "samples": 0,
                                                        "accuracy": {p: 0.0 for p in policies},
                                                        "score": {p: 0.0 for p in policies}})
        row["samples"] += 1
        for p in policies:
            row["accuracy"][p] += r["replies"][p]["correct"]
            row["score"][p] += r["replies"][p]["score"]
    for row in rows.values():
        for key in ("accuracy", "score"):
            row[key] = {p: 100.0 * v / row["samples"] for p, v in row[key].items()}
    return list(rows.values())


def decode_perplexity(model, ids: Sequence[int], policies: dict[str, CachePolicy], decode_from: int = 64,
                      progress: Callable[[int, int, str], None] | None = None) -> dict[str, dict]:
    """{policy: Model.perplexity result} with tokens after `decode_from` fed through the decode path."""
    check_policies(policies, model)
    out = {}
    for name, policy in policies.items():
        cb = None if progress is None else (lambda d, t, name=name: progress(d, t, name))
        result = model.perplexity(ids, decode_from=decode_from, policy=policy, progress=cb)
        out[name] = {k: result[k] for k in ("tokens", "scored", "nll", "perplexity", "decoded", "decode_nll",
                                            "decode_perplexity") if k in result}
        out[name]["cache"] = result["cache"]
    return out


# --- KL divergence against dense --------------------------------------------------------------------------
def divergence_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Per-position comparison of `logits` (N, vocab) with the reference `ref_logits` (N, vocab):
    {"kld": KL(ref || logits) per position (N,) float64 nats, "top1": (N,) bool, agreement of the argmaxes,
    "nll": the NLL of `targets` (N,) under `logits`, when given}. Shared with llama.cpp's logits in bench/."""
    ref_logp = F.log_softmax(ref_logits.double(), dim=-1)
    logp = F.log_softmax(logits.double(), dim=-1)
    kld = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)  # >= 0 in exact arithmetic
    out = {"kld": kld, "top1": ref_logits.argmax(-1) == logits.argmax(-1)}
    if targets is not None:
        out["nll"] = -logp.gather(-1, targets.view(-1, 1)).squeeze(-1)
    return out


def summarize_divergence(kld: torch.Tensor, top1: torch.Tensor, nll: torch.Tensor | None = None) -> dict:
    """llama.cpp's summary of per-position KL divergences: mean (and its standard error), median, 99th
    percentile and maximum, in nats; top-1 agreement as a fraction; decode perplexity from `nll`."""
    kld = kld.double()
    n = kld.numel()
    if n == 0:
        raise LeankError("no positions to compare")
    out = {"positions": n, "kld_mean": float(kld.mean()),
           "kld_stderr": float(kld.std() / math.sqrt(n)) if n > 1 else 0.0,
           "kld_median": float(kld.quantile(0.5)), "kld_p99": float(kld.quantile(0.99)),
           "kld_max": float(kld.max()), "top1_agreement": float(top1.double().mean())}
    if nll is not None:
        out["decode_nll"] = float(nll.double().mean())
        out["decode_perplexity"] = math.exp(out["decode_nll"])
    return out


REFERENCES = ("decode", "prefill")


@torch.inference_mode()
def kl_divergence(model, ids: Sequence[int], policies: dict[str, CachePolicy], decode_from: int = 64,
                  reference: str = "decode", progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """{policy: divergence from dense} over `ids` decoded one token at a time (module docstring).

    The first `decode_from` tokens are prefilled; positions decode_from .. len(ids)-2 are compared (each
    predicts the next token of the text). Per policy: `summarize_divergence`'s figures, dense's decode
    perplexity on the same positions and the cache's bytes at the end (`cache`). A dense policy has
    nothing to compare with and is refused.

    `reference="decode"` decodes a dense cache in lockstep with the policies; "prefill" takes dense's
    logits from one teacher-forced pass over the whole text instead (the same function of the same
    tokens, up to float rounding: one pass instead of one step per token, for long texts on a CPU);
    that pass also gives the prefix's K/V, so the text is prefilled once, not twice.
    """
    ids = list(ids)
    if reference not in REFERENCES:
        raise LeankError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    dense_names = [name for name, p in policies.items() if p.is_dense]
    if dense_names:
        raise LeankError(f"policy {dense_names[0]!r} is dense: the KL divergence compares a compressed cache "
                         "with the dense one, so a dense policy has nothing to compare")
    check_policies(policies, model)
    if decode_from < 1:
        raise LeankError(f"the prefix must be at least 1 token, got {decode_from}")
    if len(ids) < decode_from + 2:
        raise LeankError(f"the text has {len(ids)} tokens, fewer than the {decode_from}-token prefix and 2 more: "
                         "nothing would be decoded and compared")
    model._check_length(len(ids))
    a = model.args
    n = len(ids) - 1 - decode_from  # decoded positions: tokens decode_from .. len-2 are fed, each scored
    ref_rows = None
    dense = DenseCache(a.n_layers, a.n_kv_heads, a.head_dim, device=model.device, dtype=model.dtype,
                       capacity=len(ids))
    if reference == "prefill":
        # dense logits of the scored positions (only those rows: 16K on a 152K vocabulary would be 10 GB)
        # from one pass over the text, whose first `decode_from` tokens' K/V are the prefix's (causal)
        ref_rows = model.logits(ids[: len(ids) - 1], dense, start=decode_from)
        dense.truncate(decode_from)
    else:
        model.transformer(torch.tensor([ids[:decode_from]], dtype=torch.long, device=model.device), dense,
                          logits_for="none")
    caches = {name: compress_cache(dense, p, a) for name, p in policies.items()}
    kld = {name: torch.empty(n, dtype=torch.float64) for name in policies}
    top1 = {name: torch.empty(n, dtype=torch.bool) for name in policies}
    nll = {name: torch.empty(n, dtype=torch.float64) for name in policies}
    dense_nll = torch.empty(n, dtype=torch.float64)
    for j in range(n):
        i = decode_from + j
        token = torch.tensor([ids[i]], dtype=torch.long)
        target = torch.tensor([ids[i + 1]], dtype=torch.long)
        ref = step(model.transformer, dense, token) if ref_rows is None else ref_rows[j : j + 1]
        dense_nll[j] = F.cross_entropy(ref.double(), target)
        for name, cache in caches.items():
            d = divergence_stats(ref, step(model.transformer, cache, token), target)
            kld[name][j], top1[name][j], nll[name][j] = d["kld"][0], d["top1"][0], d["nll"][0]
        if progress and (j % 16 == 0 or j == n - 1):
            progress(j + 1, n)
    dense_ppl = math.exp(float(dense_nll.mean()))
    out = {}
    for name, cache in caches.items():
        out[name] = {"tokens": len(ids), "prefix": decode_from, "reference": reference,
                     **summarize_divergence(kld[name], top1[name], nll[name]),
                     "dense_decode_perplexity": dense_ppl, "cache": cache.nbytes().as_dict()}
    return out
