"""Sampling and the decode loop: prefill, then one token at a time, streamed.

Kept apart from the model so the hot path reads top to bottom: `prefill`, `decode_one`, `stream`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


@dataclass
class SamplingParams:
    """How the next token is picked: the one table of sampling defaults, llama.cpp's (`llama-cli`'s
    `--temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05 --repeat-penalty 1.0 --repeat-last-n 64`, presence and
    frequency penalties 0). temperature 0 is greedy; the penalties apply to greedy decoding too.

    Order: penalties on the raw logits, then min-p (judged at temperature 1, as llama.cpp does: a token
    stays if its probability is at least `min_p` times the likeliest one's), then temperature, top-k, top-p.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # > 1 discourages tokens seen in the last `repeat_last_n` tokens
    repeat_last_n: int = 64  # how many recent tokens (prompt and reply) the penalties look at; 0: none
    presence_penalty: float = 0.0  # subtracted once from the logit of every token seen
    frequency_penalty: float = 0.0  # subtracted once per occurrence

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                           or self.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """`logits` with llama.cpp's repetition penalties for the last `repeat_last_n` tokens of `history`:
    a seen token's logit is divided by `repeat_penalty` when positive and multiplied by it when negative,
    then lowered by `presence_penalty` plus `frequency_penalty` times its count."""
    recent = list(history)[-params.repeat_last_n:] if params.repeat_last_n > 0 else []
    if not recent or not params.penalizes:
        return logits
    ids, counts = torch.unique(torch.tensor(recent, dtype=torch.long), return_counts=True)
    ids, counts = ids[ids < logits.shape[-1]], counts[ids < logits.shape[-1]]
    out = logits.clone()
    seen = out[ids]
    seen = torch.where(seen > 0, seen / params.repeat_penalty, seen * params.repeat_penalty)
    out[ids] = seen - params.presence_penalty - params.frequency_penalty * counts.to(out.dtype)
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           history: Sequence[int] = ()) -> int:
    """One token id from a (vocab,) float32 logits row; `history`: the tokens before it (for penalties)."""
    logits = apply_penalties(logits, history, params)
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    if 0 < params.min_p <= 1:
        logits = logits.masked_fill(logits < logits.max() + math.log(params.min_p), float("-inf"))
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        values, indices = torch.topk(logits, k)
    else:
        values, indices = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if 0 < params.top_p < 1:
        cum = torch.cumsum(probs, dim=-1)
        keep = (cum - probs) < params.top_p  # always keeps the first
        probs = probs * keep
        probs = probs / probs.sum()
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""
    cache: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from the prefill; later ones each cost one decode step
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            "finish_reason": self.finish_reason,
            "cache": self.cache,
        }


@dataclass
class Step:
    """One streamed piece of a generation. The last step has `finish_reason` set and no token."""

    text: str
    token: int | None = None
    finish_reason: str | None = None
    stats: GenerationStats | None = None


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a completed stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@torch.inference_mode()
def stream_tokens(model, cache, prompt_ids: Sequence[int], *, max_tokens: int, sampling: SamplingParams,
                  stop: Sequence[str] = (), eog_ids=frozenset(), context_length: int | None = None) -> Iterator[Step]:
    """Feed `prompt_ids` after what `cache` holds, then sample up to `max_tokens` tokens.

    The last sampled token is not fed back (a following turn starts with it), so the cache always
    holds exactly the tokens that have been fed: `cache.seq_len`.
    """
    transformer, tok = model.transformer, model.tokenizer
    device = transformer.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    decoder = tok.stream_decoder()
    matcher = StopMatcher(stop)
    limit = context_length or model.args.context_length

    t0 = time.perf_counter()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = transformer(ids, cache, logits_for="last")[0, -1].float().cpu()
    stats.prefill_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    finish = "length"
    history = list(prompt_ids)[-sampling.repeat_last_n:] if sampling.penalizes else []
    while True:
        token = sample(logits, sampling, generator, history)
        if sampling.penalizes:
            history = (history + [token])[-sampling.repeat_last_n:]
        stats.generated_tokens += 1
        if token in eog_ids:
            finish = "stop"
            break
        text, stopped = matcher.push(decoder.push(token))
        yield Step(text, token)  # every token, even when its text is held back (partial UTF-8, stop prefix)
        if stopped:
            finish = "stop"
            break
        if stats.generated_tokens >= max_tokens:
            break
        if cache.seq_len + 1 > limit:
            finish = "context"
            break
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        logits = transformer(step, cache, logits_for="last")[0, -1].float().cpu()
    stats.decode_seconds = time.perf_counter() - t1
    tail = matcher.flush() if finish != "stop" else ""
    tail += decoder.flush() if finish != "stop" else ""
    stats.finish_reason = finish
    stats.cache = cache.nbytes().as_dict()
    model.last_stats = stats
    yield Step(tail, None, finish, stats)
