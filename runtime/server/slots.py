"""Slots and the batched decode loop behind `leank serve`: several conversations, one forward pass per step.

Each slot owns a one-sequence cache (dense or compressed, as the server's policy says) and the token
ids it holds. A request takes an idle slot (the one whose cached tokens share the longest prefix with
its prompt: a client that resends its history only feeds what is new), is prefilled alone, PREFILL_CHUNK
tokens between two decode steps (so a long prompt delays the other conversations' tokens, never stops
them), then joins the batch: every step feeds the last chosen token of each active slot as one (B, 1) forward pass, so
the weight matrices are read once for all of them (`leank.runtime.decode.step`). `BatchCache` gives
that pass one cache per row (positions and attention are per sequence). Requests join and leave
between steps; a cancelled request (the client went away) frees its slot at the next one.

The loop runs in one thread (`Engine.run`); the web layer (`leank.runtime.server.api`) submits `Job`s
and reads their events from an asyncio queue.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from leank.errors import LeankError
from leank.runtime.cache.base import kv_dtype
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.plan import sequence_nbytes
from leank.runtime.cache.session import load_session, save_session
from leank.runtime.decode import prefill, step
from leank.runtime.generate import SamplingParams, StopMatcher, sample
from leank.runtime.memory import decoded_matrix_nbytes, weights_nbytes, working_set_nbytes

# Prompt tokens fed between two decode steps. A prompt up to this long is prefilled in one pass, exactly
# as `Model.stream` does it (so the server's greedy replies equal the library's).
PREFILL_CHUNK = 512


class BatchCache:
    """B one-sequence caches seen by the transformer as one batch of B rows, one new token per row.

    `positions` (each row's next position) tells the model where each row's token sits; `append` and
    `attend` go row by row to each sequence's own cache."""

    def __init__(self, caches: list):
        self.caches = caches
        self.n_layers = caches[0].n_layers
        self.batch = len(caches)

    @property
    def positions(self) -> list[int]:
        return [c.seq_len for c in self.caches]

    @property
    def seq_len(self) -> int:  # only the transformer's single-sequence path reads it
        raise TypeError("a BatchCache has one length per row: read `positions`")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for b, c in enumerate(self.caches):
            c.append(layer, k[b : b + 1], v[b : b + 1])

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([c.attend(layer, q[b : b + 1]) for b, c in enumerate(self.caches)])

    # The device-length calls (`leank.runtime.graph`), row by row over the members' own: on CUDA the whole
    # batch's step is one captured graph (each row's attention reads its own lengths from device memory),
    # captured again when a member's buffers change or the batch does.
    def static_prepare(self) -> bool:
        return any([c.static_prepare() for c in self.caches])  # a list: every member makes its room

    def static_signature(self) -> tuple:
        return tuple(c.static_signature() for c in self.caches)

    def static_lengths(self) -> tuple[list[int], list[int]]:
        full, middle = zip(*(c.static_lengths() for c in self.caches))
        return list(full), list(middle)

    def static_append(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor) -> None:
        for b, c in enumerate(self.caches):
            c.static_append(layer, k[b : b + 1], v[b : b + 1], at[b : b + 1])

    def static_attend(self, layer: int, q: torch.Tensor, full_lens: torch.Tensor, middle_lens: torch.Tensor,
                      with_middle: tuple) -> torch.Tensor:
        return torch.cat([c.static_attend(layer, q[b : b + 1], full_lens[b : b + 1], middle_lens[b : b + 1],
                                          with_middle[b]) for b, c in enumerate(self.caches)])

    def static_advance(self) -> bool:
        return any([c.static_advance() for c in self.caches])


@dataclass
class Job:
    """One completion request: its prompt ids and sampling, and where its events go.

    Events put on `events`: ("text", str) pieces, then ("done", dict) or ("error", str)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    slot_id: int | None = None  # ask for this slot (llama-server's id_slot)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    cancelled: bool = False
    # filled in by the engine
    cached_tokens: int = 0
    completion_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    prefill_seconds: float = 0.0
    reserved_bytes: int = 0  # the cache bytes this job may reach (prompt + max_tokens), held while it runs
    generator: torch.Generator | None = field(default=None, repr=False)
    decoder: object = field(default=None, repr=False)
    matcher: StopMatcher | None = field(default=None, repr=False)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Slot:
    def __init__(self, slot_id: int, cache):
        self.id, self.cache = slot_id, cache
        self.tokens: list[int] = []  # what the cache holds
        self.job: Job | None = None
        self.next_token: int | None = None  # chosen, not yet fed
        self.todo: list[int] = []  # prompt tokens still to prefill
        self.last_used = 0.0

    def info(self) -> dict:
        return {"id": self.id, "is_processing": self.job is not None, "n_tokens": len(self.tokens),
                "cache_bytes": self.cache.nbytes().total}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """The slots and the thread that runs them (see the module docstring)."""

    def __init__(self, model, policy, *, parallel: int = 1, context: int | None = None, memory: int | None = None):
        self.model, self.policy = model, policy
        # --memory: weights + working set + every running request's cache at its prompt + max_tokens must fit
        self.memory, self.weights_bytes = memory, weights_nbytes(model.transformer)
        self.element_bytes = torch.finfo(kv_dtype(model.device, model.dtype)).bits // 8  # the full region's
        self.context = min(context or model.args.context_length, model.args.context_length)
        self.working_bytes = working_set_nbytes(
            model.args, self.context, rows=PREFILL_CHUNK, batch=parallel, policy=policy,
            compute_bytes=torch.finfo(model.dtype).bits // 8, cache_bytes=self.element_bytes,
            decoded_matrix=decoded_matrix_nbytes(model.transformer))
        self.slots = [Slot(i, model.new_cache(policy=policy)) for i in range(parallel)]
        self.pending: deque[Job] = deque()  # submitted, not yet seen by the loop (guarded by `wake`)
        self.waiting: deque[Job] = deque()  # seen, waiting for a slot (the loop's own)
        self.wake = threading.Condition()  # short: submitting, cancelling, waiting for work
        self.lock = threading.RLock()  # the slots: held by the loop for each step, and by slot actions
        self.eog = model.tokenizer.eog_ids
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="leank-engine", daemon=True)
        self.steps = 0
        self._batch: BatchCache | None = None  # the caches decoding together at the last step

    # --- the web layer's side -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify_all()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.wake:
            self.pending.append(job)
            self.wake.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # read by the loop between steps
        with self.wake:
            self.wake.notify_all()

    def request_nbytes(self, job: Job) -> int:
        """The cache bytes `job` may reach: its prompt plus max_tokens, under the server's policy."""
        n = min(self.context, len(job.prompt_ids) + job.max_tokens)
        return sequence_nbytes(self.policy, self.model.args, n, self.element_bytes)

    def room(self) -> int:
        """The cache bytes the memory budget leaves after the weights and the working set."""
        return self.memory - self.weights_bytes - self.working_bytes

    def idle(self) -> int:
        return sum(s.job is None for s in self.slots)

    # --- slot files (llama-server's /slots/{id}?action=...) ----------------------------------------------
    def slot_save(self, slot_id: int, path) -> dict:
        with self.lock:
            slot = self._idle_slot(slot_id)
            t0 = time.perf_counter()
            size = save_session(path, self.model, slot.cache, slot.tokens)
            return {"id_slot": slot_id, "n_saved": len(slot.tokens), "n_written": size,
                    "timings": {"save_ms": 1000 * (time.perf_counter() - t0)}}

    def slot_restore(self, slot_id: int, path) -> dict:
        with self.lock:
            slot = self._idle_slot(slot_id)
            t0 = time.perf_counter()
            saved = load_session(path, self.model, self.policy)
            if len(saved.tokens) >= self.context:
                raise LeankError(f"{path.name}: the session holds {len(saved.tokens)} tokens; this server's "
                                 f"context is {self.context}")
            slot.cache, slot.tokens = saved.cache, saved.tokens
            return {"id_slot": slot_id, "n_restored": len(saved.tokens), "n_read": path.stat().st_size,
                    "timings": {"restore_ms": 1000 * (time.perf_counter() - t0)}}

    def slot_erase(self, slot_id: int) -> dict:
        with self.lock:
            slot = self._idle_slot(slot_id)
            n = len(slot.tokens)
            slot.cache, slot.tokens = self.model.new_cache(policy=self.policy), []
            return {"id_slot": slot_id, "n_erased": n}

    def _idle_slot(self, slot_id: int) -> Slot:
        slot = self.slots[slot_id]
        if slot.job is not None:
            raise SlotBusy(f"slot {slot_id} is processing a request")
        return slot

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.wake:
                while (not self.stopped and not self.pending and not self.waiting
                       and all(s.job is None for s in self.slots)):
                    self.wake.wait()
                if self.stopped:
                    return
                self.waiting.extend(self.pending)
                self.pending.clear()
            with self.lock:
                self._drop_cancelled()
                self._admit()
                self._prefill_chunk()
                decoding = [s for s in self.slots if s.job is not None and not s.todo]
                if decoding:
                    self._step(decoding)

    def _drop_cancelled(self) -> None:
        self.waiting = deque(j for j in self.waiting if not j.cancelled)
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                s.job, s.next_token = None, None
                if s.todo:  # stopped inside its prompt: the cache holds what was fed
                    s.todo = []

    def _pick(self, job: Job) -> Slot | None:
        idle = [s for s in self.slots if s.job is None]
        if job.slot_id is not None:
            return next((s for s in idle if s.id == job.slot_id), None)
        if not idle:
            return None
        return max(idle, key=lambda s: (common_prefix(s.tokens, job.prompt_ids), -s.last_used))

    def _admit(self) -> None:
        """Give waiting jobs idle slots, reusing each slot's longest common prefix."""
        waiting = deque()
        while self.waiting:
            job = self.waiting.popleft()
            slot = self._pick(job)
            if slot is None:
                waiting.append(job)
                continue
            if self.memory is not None and not self._make_room(slot, job):
                waiting.append(job)
                waiting.extend(self.waiting)  # first come, first served: nobody overtakes a waiting job
                self.waiting.clear()
                break
            ids = job.prompt_ids
            n = min(common_prefix(slot.tokens, ids), len(ids) - 1)  # at least one token is fed: its logits
            if n < len(slot.tokens) and not self._truncate(slot.cache, n):
                slot.cache, n = self.model.new_cache(policy=self.policy), 0
            slot.tokens, slot.todo = ids[:n], ids[n:]
            job.cached_tokens = n
            slot.job, slot.last_used = job, time.perf_counter()
            job.generator = None if job.sampling.seed is None else torch.Generator().manual_seed(job.sampling.seed)
            job.decoder = self.model.tokenizer.stream_decoder()
            job.matcher = StopMatcher(job.stop)
        self.waiting = waiting

    def _make_room(self, slot: Slot, job: Job) -> bool:
        """Whether `job` fits the memory budget now; idle slots' caches (kept for prefix reuse) are
        dropped, least recently used first, to make it fit."""
        job.reserved_bytes = self.request_nbytes(job)
        room = self.room() - sum(s.job.reserved_bytes for s in self.slots if s.job is not None)
        kept = sorted((s for s in self.slots if s.job is None and s is not slot and s.tokens), key=lambda s: s.last_used)
        held = sum(s.cache.nbytes().total for s in kept) + slot.cache.nbytes().total
        while kept and job.reserved_bytes + held > room:
            s = kept.pop(0)
            held -= s.cache.nbytes().total
            s.cache, s.tokens = self.model.new_cache(policy=self.policy), []
        return job.reserved_bytes <= room

    def _prefill_chunk(self) -> None:
        """Feed up to PREFILL_CHUNK prompt tokens of the slot that has waited longest for its prompt."""
        filling = [s for s in self.slots if s.job is not None and s.todo]
        if not filling:
            return
        slot = min(filling, key=lambda s: s.job.submitted)
        job, chunk = slot.job, slot.todo[:PREFILL_CHUNK]
        t0 = time.perf_counter()
        try:
            logits = prefill(self.model.transformer, slot.cache, torch.tensor([chunk], dtype=torch.long))[0]
        except Exception as e:  # never let one request take the loop down
            slot.job, slot.next_token, slot.todo = None, None, []
            slot.cache, slot.tokens = self.model.new_cache(policy=self.policy), []
            job.emit("error", f"{type(e).__name__}: {e}")
            return
        job.prefill_seconds += time.perf_counter() - t0
        slot.tokens += chunk
        slot.todo = slot.todo[len(chunk):]
        if not slot.todo:
            self._chosen(slot, logits)

    @staticmethod
    def _truncate(cache, n: int) -> bool:
        if isinstance(cache, DenseCache):
            cache.truncate(n)
            return True
        return isinstance(cache, CompressedCache) and cache.truncate(n)

    def _step(self, active: list[Slot]) -> None:
        tokens = torch.tensor([s.next_token for s in active], dtype=torch.long)
        caches = [s.cache for s in active]
        # the same batch object while the same caches decode together: on CUDA its captured step is replayed
        if self._batch is None or self._batch.caches != caches:  # caches compare by identity
            self._batch = BatchCache(caches)
        batch = self._batch
        try:
            logits = step(self.model.transformer, batch, tokens)
        except Exception as e:
            for s in active:
                s.job.emit("error", f"{type(e).__name__}: {e}")
                s.job, s.next_token = None, None
                s.cache, s.tokens = self.model.new_cache(policy=self.policy), []
            return
        self.steps += 1
        for row, s in enumerate(active):
            s.tokens.append(s.next_token)
            self._chosen(s, logits[row])

    def _chosen(self, slot: Slot, logits: torch.Tensor) -> None:
        """Pick the next token of `slot` from its logits; stream its text or finish the request."""
        job = slot.job
        token = sample(logits, job.sampling, job.generator)
        if not job.first_token_at:
            job.first_token_at = time.perf_counter()
        if token in self.eog and not job.ignore_eos:
            return self._finish(slot, "stop", flush=True)
        job.completion_tokens += 1
        text, stopped = job.matcher.push(job.decoder.push(token))
        if text:
            job.emit("text", text)
        if stopped:
            return self._finish(slot, "stop", flush=False)
        if job.completion_tokens >= job.max_tokens or len(slot.tokens) + 1 > self.context:
            return self._finish(slot, "length", flush=True)
        slot.next_token = token

    def _finish(self, slot: Slot, reason: str, flush: bool) -> None:
        job = slot.job
        if flush:
            tail = job.matcher.flush() + job.decoder.flush()
            if tail:
                job.emit("text", tail)
        now = time.perf_counter()
        decode_s = now - job.first_token_at
        job.emit("done", {
            "finish_reason": reason, "id_slot": slot.id,
            "prompt_tokens": len(job.prompt_ids), "cached_tokens": job.cached_tokens,
            "completion_tokens": job.completion_tokens,
            "timings": {"prompt_n": len(job.prompt_ids) - job.cached_tokens, "cache_n": job.cached_tokens,
                        "prompt_ms": 1000 * job.prefill_seconds,
                        "ttft_ms": 1000 * (job.first_token_at - job.submitted),
                        "predicted_n": job.completion_tokens, "predicted_ms": 1000 * decode_s},
        })
        slot.job, slot.next_token, slot.last_used = None, None, now


class SlotBusy(Exception):
    """A slot action on a slot that is processing a request."""
