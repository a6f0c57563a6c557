"""Text generation on top of the token loop (`leank.runtime.decode`): sampling, stop strings, streamed
text pieces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from leank.runtime import defaults
from leank.runtime.decode import Decode, GenerationStats


@dataclass
class SamplingParams:
    """How the next token is picked; the defaults are llama.cpp's (`leank.runtime.defaults`).
    temperature 0 is greedy."""

    temperature: float = defaults.TEMPERATURE
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    seed: int | None = None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) float32 logits row."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
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
    run = Decode(model.transformer, cache, prompt_ids, lambda logits: sample(logits, sampling, generator),
                 max_tokens=max_tokens, context_length=context_length or model.args.context_length, eog_ids=eog_ids)
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
