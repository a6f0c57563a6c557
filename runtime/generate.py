"""Text generation on top of the token loop (`leank.runtime.decode`): sampling, stop strings, streamed
text pieces."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from leank.runtime import defaults
from leank.runtime.decode import Decode, GenerationStats


@dataclass
class SamplingParams:
    """How the next token is picked; the defaults are llama.cpp's (`leank.runtime.defaults`: `llama-cli`'s
    `--temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05 --repeat-penalty 1.0 --repeat-last-n 64`, presence and
    frequency penalties 0). temperature 0 is greedy; the penalties apply to greedy decoding too.

    Order: penalties on the raw logits, then min-p (judged at temperature 1, as llama.cpp does: a token
    stays if its probability is at least `min_p` times the likeliest one's), then temperature, top-k, top-p.
    """

    temperature: float = defaults.TEMPERATURE
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    seed: int | None = None
    min_p: float = defaults.MIN_P
    repeat_penalty: float = defaults.REPEAT_PENALTY  # > 1 discourages tokens seen in the last `repeat_last_n`
    repeat_last_n: int = defaults.REPEAT_LAST_N  # recent tokens (prompt and reply) the penalties see; 0: none
    presence_penalty: float = defaults.PRESENCE_PENALTY  # subtracted once from the logit of every token seen
    frequency_penalty: float = defaults.FREQUENCY_PENALTY  # subtracted once per occurrence

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                           or self.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """`logits` with llama.cpp's repetition penalties for the last `repeat_last_n` tokens of `history`:
    a seen token's logit is divided by `repeat_penalty` when positive and multiplied by it when negative,
    then lowered by `presence_penalty` plus `frequency_penalty` times its count."""
    if not params.penalizes:  # the default: nothing to copy or count on the decode step
        return logits
    recent = list(history)[-params.repeat_last_n:]
    if not recent:
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


def stream_tokens(model, cache, prompt_ids: Sequence[int], *, max_tokens: int, sampling: SamplingParams,
                  stop: Sequence[str] = (), eog_ids=frozenset(), context_length: int | None = None) -> Iterator[Step]:
    """Feed `prompt_ids` after what `cache` holds, then sample up to `max_tokens` tokens, as text.

    The token loop is `leank.runtime.decode.Decode`; this layer turns its tokens into text pieces
    (partial UTF-8 held back by the tokenizer's stream decoder, stop strings by `StopMatcher`). The
    last step carries the finish reason and the run's stats.
    """
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    decoder = model.tokenizer.stream_decoder()
    matcher = StopMatcher(stop)
    recent = list(prompt_ids)[-sampling.repeat_last_n:] if sampling.penalizes else []

    def choose(logits: torch.Tensor) -> int:  # the penalties see the prompt's last tokens and the reply's
        return sample(logits, sampling, generator,
                      recent + run.tokens[-sampling.repeat_last_n:] if sampling.penalizes else ())

    run = Decode(model.transformer, cache, prompt_ids, choose, max_tokens=max_tokens,
                 context_length=context_length or model.args.context_length, eog_ids=eog_ids)
    tokens = iter(run)
    stopped = False
    try:
        for token in tokens:
            text, stopped = matcher.push(decoder.push(token))
            yield Step(text, token)  # every token, even when its text is held back (partial UTF-8, stop prefix)
            if stopped:
                break
    finally:
        tokens.close()  # ends the loop now, so that its stats are final
    stats = run.stats
    tail = "" if stats.finish_reason == "stop" else matcher.flush() + decoder.flush()
    yield Step(tail, None, stats.finish_reason, stats)
