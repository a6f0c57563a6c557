"""One decode step as one CUDA-graph replay.

A decode step of an 8B model is ~1,000 small kernels; launched one by one from Python it takes ~20 ms
on an H200 whatever the GPU does (issue 14's profile: Python and launches, not the weights or the
attention). `GraphStep` captures the step once and replays it: the token and the lengths go into
device tensors, the cache writes the new K/V at a device index and its attention kernels read the
lengths from device memory (`static_append`/`static_attend` in `leank.runtime.cache.dense` and
`.compressed`), so one capture serves every length its buffers can hold.

Between replays the host keeps the cache's true lengths and moves whole blocks into the compressed
middle region (`static_advance`: once every `block_tokens` steps, op by op). A step is captured again
only when what it was captured over changes: a buffer that grew (a longer prompt, a dense cache past
its capacity), or the middle region's first tokens. `signature()` says which.

    step = graph_step(transformer, cache)   # None where graphs do not apply (CPU, float32, turned off)
    logits = step(tokens)                   # (B,) token ids on the host -> (B, vocab) float32 on the GPU

`LEANK_CUDA_GRAPHS=0` turns graphs off (every step op by op, as before). A capture that fails says so
in one line on stderr and the model's caches decode op by op from then on (never silently slow).
"""
from __future__ import annotations

import sys
import weakref

import torch

from leank.kernels.cpu import switched_off

_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> GraphStep, or False: op by op
# models whose capture failed: every cache of theirs decodes op by op from then on (a chat's next cache, a
# server's next batch would otherwise try, and say so, again)
_FAILED: "weakref.WeakSet" = weakref.WeakSet()


def graphs_enabled() -> bool:
    return not switched_off("LEANK_CUDA_GRAPHS")


def graph_step(transformer, cache) -> "GraphStep | None":
    """The captured step of `cache` under `transformer`, made on first use; None where it does not apply:
    not CUDA, not float16/bfloat16, a cache without device lengths (`static_attend`), graphs turned off,
    or an earlier capture under this model that failed."""
    if transformer.device.type != "cuda" or transformer.dtype not in (torch.float16, torch.bfloat16):
        return None
    if not graphs_enabled() or not hasattr(cache, "static_attend") or transformer in _FAILED:
        return None
    step = _STEPS.get(cache)
    if step is None:
        step = _STEPS[cache] = GraphStep(transformer, cache)
    return step or None


class _StepView:
    """What the transformer sees during a captured step: the cache's device-length calls."""

    def __init__(self, cache, positions, at, full_lens, middle_lens, with_middle: bool | tuple):
        self.cache, self.positions, self.at = cache, positions, at
        self.full_lens, self.middle_lens, self.with_middle = full_lens, middle_lens, with_middle

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.static_append(layer, k, v, self.at)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.cache.static_attend(layer, q, self.full_lens, self.middle_lens, self.with_middle)


def begin_step(transformer, cache, meta: torch.Tensor) -> tuple[bool, bool | tuple, tuple]:
    """Before a step: room in the cache's buffers and the RoPE tables for one more token, and the cache's
    host lengths into `meta` (3, B) int64: per row the full-region index the new token goes to, its
    position, the middle region's length. Returns (a cache buffer changed, the middle holds tokens: one flag,
    or one per row for a cache whose rows have their own lengths, the tokens each row holds)."""
    changed = cache.static_prepare()
    full, middle = cache.static_lengths()
    if isinstance(full, int):  # every row at one length
        meta[0].fill_(full)
        meta[1].fill_(full + middle)
        meta[2].fill_(middle)
        transformer.rope.reserve(full + middle + 1)
        return changed, middle > 0, (full + middle,) * meta.shape[1]
    # rows at their own lengths (`leank.runtime.server.slots.BatchCache`): per-row lists
    f, m = torch.tensor(full, dtype=torch.long), torch.tensor(middle, dtype=torch.long)
    meta[0].copy_(f)
    meta[1].copy_(f + m)
    meta[2].copy_(m)
    seq = tuple((f + m).tolist())
    transformer.rope.reserve(max(seq) + 1)
    return changed, tuple(n > 0 for n in middle), seq


def static_forward(transformer, cache, tokens: torch.Tensor, meta: torch.Tensor,
                   with_middle: bool | tuple) -> torch.Tensor:
    """One step through the cache's device-length calls: tokens (B, 1) and `meta` (`begin_step`) on the
    model's device -> logits (B, vocab) float32. Reads nothing on the host: capturable."""
    at, pos, mid = meta[0], meta[1], meta[2]
    view = _StepView(cache, pos, at, (at + 1).to(torch.int32), mid.to(torch.int32), with_middle)
    return transformer.forward(tokens, view, logits_for="last")[:, -1]


@torch.inference_mode()
def static_step(transformer, cache, tokens: torch.Tensor) -> torch.Tensor:
    """What one replay does, op by op, on any device (tests compare it with the ordinary step)."""
    dev = transformer.device
    meta = torch.zeros(3, cache.batch, dtype=torch.long)
    _, with_middle, _ = begin_step(transformer, cache, meta)
    logits = static_forward(transformer, cache, tokens.reshape(-1, 1).to(dev), meta.to(dev), with_middle)
    cache.static_advance()
    return logits


class GraphStep:
    """See the module docstring. `captures` counts captures (tests and benchmarks read it)."""

    def __init__(self, transformer, cache):
        self.transformer, self.cache = transformer, cache
        B, dev = cache.batch, transformer.device
        self.vocab = transformer.args.vocab_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        # per row: write index in the full region, position, middle length (copied in before each replay)
        self._meta_host = torch.zeros(3, B, dtype=torch.long).pin_memory()
        self._meta = torch.zeros(3, B, dtype=torch.long, device=dev)
        self._copied = torch.cuda.Event()  # the last copy out of _meta_host (it is reused after that)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._signature = self._current = None
        self._moved, self._expected, self._rope_ptr = True, (), None
        self.captures = 0

    def signature(self) -> tuple:
        """The cache's buffers and the RoPE tables the step indexes (each may grow between steps)."""
        return self.cache.static_signature() + (self.transformer.rope.data_ptr(),)

    def _forward(self, with_middle: bool | tuple) -> torch.Tensor:
        return static_forward(self.transformer, self.cache, self.tokens, self._meta, with_middle)

    def _capture(self, signature: tuple) -> None:
        self.graph = self.logits = None  # the old graph's private memory is freed first
        with_middle = self._with_middle
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager once: kernels compiled, cuBLAS planned, the step's own result
            self._forward(with_middle)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward(with_middle)
        self.graph, self._signature = graph, signature
        self.captures += 1

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (`tokens` (B,) on the host or the device); the next-token logits
        (B, vocab) float32 on the device, valid until the next call."""
        cache = self.cache
        tokens = tokens.reshape(-1, 1)
        if not tokens.is_cuda and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise IndexError(f"token id out of range [0, {self.vocab})")
        self._copied.synchronize()
        changed, self._with_middle, seq = begin_step(self.transformer, cache, self._meta_host)
        # the tables are the transformer's: any cache's prompt may have grown them since the last step
        rope = self.transformer.rope.data_ptr()
        changed |= rope != self._rope_ptr
        self._rope_ptr = rope
        self._meta.copy_(self._meta_host, non_blocking=True)
        self._copied.record()
        self.tokens.copy_(tokens, non_blocking=True)
        # what the graph was captured over can only have changed if a buffer grew, blocks moved, or tokens
        # came another way (a prompt, a truncation): the signature (~600 pointers) is read only then
        if changed or self._moved or seq != self._expected:
            self._current = (self._with_middle, self.signature())
        signature = self._current
        if signature != self._signature:
            try:
                self._capture(signature)
            except Exception as e:  # noqa: BLE001 - any failure: say it once, decode op by op from now on
                _FAILED.add(self.transformer)
                self.graph = None
                print(f"leank: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "decoding op by op", file=sys.stderr)
                raise CaptureFailed from e
        self.graph.replay()
        self._moved = cache.static_advance()
        self._expected = tuple(n + 1 for n in seq)
        return self.logits


class CaptureFailed(Exception):
    """The step could not be captured (said on stderr); the caller runs this step op by op."""
