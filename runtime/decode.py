"""The one token-level decode loop: prefill a prompt, then one token per step.

Generation, chat, `perplexity --decode` and `leank eval` all run `Decode`; what differs is who picks
the next token (`choose`: sampling, greedy argmax, or the scored text's own next token) and when the
caller stops reading. Text (detokenizing, stop strings) is layered on top, in `leank.runtime.generate`.

    run = Decode(transformer, cache, prompt_ids, choose, max_tokens=64, context_length=n_ctx)
    for token in run:          # every chosen token; break out at any time
        ...
    run.stats                  # prefill/decode seconds, tokens, finish reason, the cache's bytes

The primitives below it, `prefill` and `step`, are batch-first: token tensors (B, T) and (B,) in,
float32 logits (B, vocab) out. A cache of B sequences with their own lengths (the server, the CUDA
graph engine) drives these same two calls; `Decode` itself runs one sequence (B = 1).

The last chosen token is not fed back (a following turn starts with it), so the cache always holds
exactly the tokens that have been fed: `cache.seq_len`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from leank.runtime import graph


@torch.inference_mode()
def prefill(transformer, cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed `ids` (B, T) after what `cache` holds; the next-token logits (B, vocab), float32 on the CPU."""
    return transformer(ids.to(transformer.device), cache, logits_for="last")[:, -1].float().cpu()


@torch.inference_mode()
def step(transformer, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence, `tokens` (B,); the next-token logits (B, vocab), float32 on the CPU.

    On CUDA the step is one CUDA-graph replay (`leank.runtime.graph`) where the cache supports it."""
    captured = graph.graph_step(transformer, cache)
    if captured is not None:
        try:
            return captured(tokens).cpu()
        except graph.CaptureFailed:  # said on stderr; this cache decodes op by op from now on
            pass
    return prefill(transformer, cache, tokens.view(-1, 1))


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


class Decode:
    """One sequence's decode loop (see the module docstring); iterate it for the chosen tokens.

    `choose(logits)` gets the (vocab,) float32 logits of the next position and returns a token id.
    A token in `eog_ids` ends the loop unyielded (finish "stop"). The loop also ends after
    `max_tokens` chosen tokens ("length"), when the next token would not fit `context_length`
    ("context"), or when the caller stops iterating ("stop"). `logits`, if given, are the next-token
    logits of a prompt that is already in the cache: nothing is prefilled then.
    """

    def __init__(self, transformer, cache, prompt_ids: Sequence[int], choose: Callable[[torch.Tensor], int], *,
                 max_tokens: int, context_length: int, eog_ids=frozenset(), logits: torch.Tensor | None = None):
        self.transformer, self.cache, self.choose = transformer, cache, choose
        self.prompt_ids, self.first_logits = list(prompt_ids), logits
        self.max_tokens, self.context_length, self.eog_ids = max_tokens, context_length, eog_ids
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.tokens: list[int] = []  # every chosen token, in order (an end-of-generation token included)

    def __iter__(self) -> Iterator[int]:
        stats, cache = self.stats, self.cache
        t0 = time.perf_counter()
        if self.first_logits is None:
            logits = prefill(self.transformer, cache, torch.tensor([self.prompt_ids], dtype=torch.long))[0]
        else:
            logits = self.first_logits.float().cpu()
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        stats.finish_reason = "stop"  # what a caller that stops iterating leaves behind
        try:
            while True:
                token = int(self.choose(logits))
                self.tokens.append(token)
                stats.generated_tokens += 1
                if token in self.eog_ids:
                    break
                yield token
                if stats.generated_tokens >= self.max_tokens:
                    stats.finish_reason = "length"
                    break
                if cache.seq_len + 1 > self.context_length:
                    stats.finish_reason = "context"
                    break
                logits = step(self.transformer, cache, torch.tensor([token], dtype=torch.long))[0]
        finally:
            stats.decode_seconds = time.perf_counter() - t1
            stats.cache = cache.nbytes().as_dict()
