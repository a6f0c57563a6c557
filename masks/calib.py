"""Calibration masks: channel importance from query/key statistics, no training.

Run the model over calibration text and score each key channel c of each (layer, KV head) by

    score[c] = mean |q_c| * mean |k_c|

with q pooled over the query heads that share the KV head, both taken after RoPE (what the cache
stores and attends). For independent query/key positions this is the expected magnitude of channel
c's contribution q_c * k_c to an attention logit: the channels whose loss moves logits least score
lowest. It is a static cousin of ThinK's per-query |q|*|k| criterion. The scores are then binarized
like LeanK's stage 2 (`leank.masks.binarize`), so heads may keep different counts, or none.

The calibration text is generated offline (the `faker` package when present, else the prose of
leank's own documentation), deterministic for a seed. Statistics are gathered by a thin cache wrapper
around a dense cache, one sequence at a time: memory stays that of one prefill.
"""
from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from leank.errors import LeankError
from leank.masks.binarize import binarize
from leank.runtime import defaults
from leank.runtime.cache.base import CacheBytes, KVCache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.mask import Mask
from leank.runtime.engine import load

DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 1024
# The first positions of every sequence are sink tokens, never pruned; their keys (often huge) are
# left out of the key statistics.
SKIP_POSITIONS = 16


# --- calibration text ----------------------------------------------------------------------------------
def _faker_documents(rng: random.Random, n: int) -> list[str]:
    from faker import Faker  # optional (extra `train`): only calibration and training text need it

    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(1 << 30))
    docs = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:  # a letter
            docs.append(f"Dear {fake.name()},\n\n" + "\n\n".join(fake.paragraphs(rng.randint(2, 4)))
                        + f"\n\nKind regards,\n{fake.name()}\n{fake.job()}, {fake.company()}")
        elif kind == 1:  # a news-like report full of entities and numbers
            city, company = fake.city(), fake.company()
            docs.append(f"{city}, {fake.date(pattern='%B %d, %Y')}. {company} said on {fake.day_of_week()} that "
                        f"its revenue grew by {rng.randint(2, 40)} percent to {rng.randint(10, 900)} million dollars. "
                        f"{fake.name()}, who has worked as a {fake.job().lower()} in {city} since {fake.year()}, "
                        f"called the results {fake.word()}. " + fake.paragraph(rng.randint(3, 6)))
        elif kind == 2:  # facts to remember and retrieve, like the needles of retrieval tasks
            lines = [f"The access code for {fake.name()} is {rng.randrange(10**6, 10**7)}." for _ in range(rng.randint(3, 8))]
            lines += [f"{fake.name()} lives at {fake.address().replace(chr(10), ', ')}." for _ in range(rng.randint(1, 3))]
            rng.shuffle(lines)
            docs.append(" ".join(lines) + " " + fake.paragraph(3))
        elif kind == 3:  # a dialogue
            a, b = fake.first_name(), fake.first_name()
            turns = [f"{a if i % 2 == 0 else b}: {fake.sentence(rng.randint(6, 16))}" for i in range(rng.randint(4, 9))]
            docs.append("\n".join(turns))
        else:  # a record-like list
            rows = [f"- {fake.name()}, {fake.job()}, born {fake.date_of_birth().isoformat()}, {fake.email()}"
                    for _ in range(rng.randint(3, 7))]
            docs.append(f"Staff of {fake.company()} ({fake.catch_phrase().lower()}):\n" + "\n".join(rows))
    return docs


def _own_documents() -> list[str]:
    """Paragraphs of English from leank's own docs and docstrings (the fallback without faker)."""
    root = Path(__file__).resolve().parents[1]
    docs = []
    for path in sorted(root.rglob("*.md")) + sorted(root.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".py":
                tree = ast.parse(text)
                nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
                text = "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        docs += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    return docs


def calibration_documents(n: int = 64, seed: int = 0) -> list[str]:
    """`n` short documents of varied English prose, generated offline and deterministic for `seed`."""
    rng = random.Random(seed)
    try:
        return _faker_documents(rng, n)
    except ImportError:
        pass
    docs = _own_documents()
    if not docs:
        raise LeankError("no calibration text: install faker (pip install faker)")
    rng.shuffle(docs)
    return [docs[i % len(docs)] for i in range(n)]


def calibration_sequences(model, n_tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                          seed: int = 0) -> list[list[int]]:
    """Token sequences of at most `seq_len` tokens (within the model's context), `n_tokens` in all."""
    seq_len = max(2, min(seq_len, model.args.context_length))
    ids: list[int] = []
    batch = 0
    while len(ids) < n_tokens:
        docs = calibration_documents(32, seed + batch)
        batch += 1
        for doc in docs:
            ids += model.tokenize(doc + "\n\n", add_special=False)
        if batch > 1000:
            raise LeankError("the calibration text does not tokenize to enough tokens")
    ids = ids[:n_tokens]
    bos = model.tokenizer.bos_id if getattr(model.tokenizer, "add_bos", False) else -1
    body = seq_len - (1 if bos >= 0 else 0)
    return [([bos] if bos >= 0 else []) + ids[i : i + body] for i in range(0, len(ids), body)]


# --- statistics ----------------------------------------------------------------------------------------
class QKStatsCache(KVCache):
    """A dense cache that also sums |k| and |q| per (layer, KV head, channel) as the model runs."""

    def __init__(self, args, n_rep: int, device, dtype, skip: int = SKIP_POSITIONS):
        self.inner = DenseCache(args.n_layers, args.n_kv_heads, args.head_dim, device=device, dtype=dtype)
        self.n_layers, self.batch, self.n_rep, self.skip = args.n_layers, 1, n_rep, skip
        shape = (args.n_layers, args.n_kv_heads, args.head_dim)
        self.k_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.q_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.k_count = [0] * args.n_layers
        self.q_count = [0] * args.n_layers

    @property
    def seq_len(self) -> int:
        return self.inner.seq_len

    def _from(self, layer: int) -> int:
        # index of the first new token at or past `skip` (the cache holds this layer's earlier tokens)
        return max(0, self.skip - self.inner.lengths[layer])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self._from(layer)
        kk = k[:, :, s:]  # (B, Hkv, T', D)
        self.k_sum[layer] += kk.abs().sum(dim=(0, 2), dtype=torch.float64)
        self.k_count[layer] += kk.shape[0] * kk.shape[2]
        self._q_from = s
        self.inner.append(layer, k, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        qq = q[:, :, self._q_from :]
        B, Hq, T, D = qq.shape
        g = qq.reshape(B, Hq // self.n_rep, self.n_rep, T, D)  # query head h uses KV head h // n_rep
        self.q_sum[layer] += g.abs().sum(dim=(0, 2, 3), dtype=torch.float64) / self.n_rep
        self.q_count[layer] += B * T
        return self.inner.attend(layer, q)

    def nbytes(self) -> CacheBytes:
        return self.inner.nbytes()

    def reset(self) -> None:
        self.inner.reset()

    def scores(self) -> torch.Tensor:
        """mean |q_c| * mean |k_c|, float32 (layers, kv_heads, head_dim) on the CPU."""
        if min(self.k_count) == 0 or min(self.q_count) == 0:
            raise LeankError(f"calibration saw no token past the first {self.skip} of a sequence; use longer text")
        k = self.k_sum / torch.tensor(self.k_count, dtype=torch.float64, device=self.k_sum.device)[:, None, None]
        q = self.q_sum / torch.tensor(self.q_count, dtype=torch.float64, device=self.q_sum.device)[:, None, None]
        return (q * k).float().cpu()


@torch.inference_mode()
def channel_scores(model, sequences: Sequence[Sequence[int]],
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Per-channel importance (layers, kv_heads, head_dim), float32, from running `model` (a loaded
    `leank.Model`) over each token sequence in turn."""
    a = model.args
    stats = QKStatsCache(a, a.n_rep, model.device, model.dtype)
    total = sum(len(s) for s in sequences)
    done = 0
    for seq in sequences:
        if len(seq) > a.context_length:
            raise LeankError(f"a calibration sequence of {len(seq)} tokens exceeds the context of {a.context_length}")
        stats.reset()
        x = torch.tensor([list(seq)], dtype=torch.long, device=model.device)
        model.transformer(x, stats, logits_for="none")
        done += len(seq)
        if progress:
            progress(done, total)
    return stats.scores()


def calibration_mask(model, ratio: float, align: int = defaults.ALIGN, n_tokens: int = DEFAULT_TOKENS,
                     seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> Mask:
    """A mask pruning `ratio` of `model`'s K channels by calibrated |q|*|k| importance (see module doc).

    `model` is a loaded `leank.Model`; anything else with a `.path` (e.g. a header) is loaded first, on
    the GPU when there is one (calibration runs the whole model: it needs the memory of `leank.load`).
    """
    if not hasattr(model, "transformer"):
        model = load(model.path, device="auto")
    if n_tokens < 2 * SKIP_POSITIONS:
        raise LeankError(f"calibration needs at least {2 * SKIP_POSITIONS} tokens, got {n_tokens}")
    sequences = calibration_sequences(model, n_tokens, seq_len, seed)
    scores = channel_scores(model, sequences, progress)
    return binarize(scores, ratio, align, method="calib", source="qk-abs-mean:generated-prose",
                    arch=model.args.arch, tokens=sum(len(s) for s in sequences), seed=seed)
