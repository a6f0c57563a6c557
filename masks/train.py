"""LeanK's two-stage mask training on a GGUF model (weights frozen, gradients only to the scaling factors).

Stage 1: a factor alpha in [0, 1] per (layer, KV head, channel), initialised to 1 and clamped after every
step, multiplies the keys of the middle context (sink and recent tokens stay unscaled) as the answer
queries see them. Loss: MSE between the final hidden states of the frozen full model and of the scaled
model at the answer positions, plus lambda * mean(alpha) (LeanK: 0.06), pushing factors to zero.
Stage 2: the mask is alpha binarized at the target ratio and alignment (`leank.masks.binarize`),
recomputed every step; training goes on through a straight-through estimator, lambda 0, half the
learning rate. AdamW, weight decay 0, linear warm-up and decay over the first and last fifth of steps.

Why this is cheap: the scaling only touches what answer queries see, so every context position's
hidden states are the same in both models. Per step, the context (prefix) runs once without autograd
into a dense cache; the full and the scaled model then differ only in the few answer tokens, which run
on top of that cache: the graph holds T_answer tokens, not the context. Scaling a key channel is applied
to the query instead ((q * alpha) . k = q . (alpha * k)), so no scaled copy of the keys is made.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from leank.errors import LeankError
from leank.masks.binarize import binarize_scores, check_binarize_args, straight_through_mask
from leank.masks.tasks import make_sample
from leank.runtime import defaults
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.mask import Mask, Provenance
from leank.runtime.gguf.schema import k_fingerprint
from leank.runtime.model.linear import Linear
from leank.runtime.outputs import atomic_write

TRAIN_TASKS = ("multikey", "multivalue")  # LeanK's two retrieval tasks, in alternation


@dataclass
class TrainConfig:
    ratio: float = defaults.RATIO  # fraction of K channels pruned
    align: int = defaults.ALIGN
    steps: int = 1000  # per stage
    stages: tuple[int, ...] = (1, 2)
    lr: float | None = None  # stage 1; stage 2 uses half. Default: 0.02 for llama, 0.04 for qwen (LeanK)
    lam: float = 0.06  # stage-1 sparsity weight
    warmup: float = 0.2  # fraction of steps with a linear warm-up, and likewise of decay
    min_tokens: int = 1024
    max_tokens: int = 4096
    sink_tokens: int = defaults.SINK_TOKENS
    recent_tokens: int = defaults.default_recent(8192)  # the recent window of an 8K-context model (the default one)
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.min_tokens > self.max_tokens:  # found here, not by an empty random range mid-run
            raise LeankError(f"--min-tokens {self.min_tokens} exceeds --max-tokens {self.max_tokens}")

    def learning_rate(self, arch: str) -> float:
        return self.lr if self.lr is not None else (0.02 if arch == "llama" else 0.04)


@dataclass
class TrainState:
    stage: int
    step: int  # steps done within `stage`
    alpha: torch.Tensor
    optimizer: dict
    history: list = field(default_factory=list)


# --- data ---------------------------------------------------------------------------------------------
@dataclass
class Example:
    prefix: list[int]  # context + question (+ the reply's first words)
    answer: list[int]  # the expected continuation


def generated_examples(model, config: TrainConfig) -> Callable[[int], Example]:
    """Example `i` of the training split: tasks alternate, lengths and depths drawn from (seed, i)."""
    def example(i: int) -> Example:
        rng = random.Random(config.seed * 1_000_003 + i)
        length = rng.randint(config.min_tokens, config.max_tokens)
        sample = make_sample(model, TRAIN_TASKS[i % len(TRAIN_TASKS)], length, rng.uniform(0.05, 0.95),
                             seed=config.seed, index=i, split="train")
        return Example(sample.context_ids + sample.question_ids, sample.answer_ids)

    return example


def save_examples(examples: list[Example], path: str | Path, force: bool = True, inputs=()) -> None:
    """Pre-tokenized examples in one file (for machines without the tokenizer, e.g. GPU hosts)."""
    flat, offsets = [], [0]
    for ex in examples:
        flat += ex.prefix + ex.answer
        offsets += [offsets[-1] + len(ex.prefix), offsets[-1] + len(ex.prefix) + len(ex.answer)]
    small = max(flat, default=0) < 65536  # most vocabularies: half the bytes (files travel to GPU hosts)
    with atomic_write(path, force=force, inputs=inputs) as tmp:
        torch.save({"format": "leank-train-examples",
                    "tokens": torch.tensor(flat, dtype=torch.int32).to(torch.uint16 if small else torch.int32),
                    "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp))


def load_examples(path: str | Path) -> Callable[[int], Example]:
    """The examples `save_examples` wrote to `path`, as a function of the example index (cycling)."""
    path = Path(path)
    if not path.is_file():
        raise LeankError(f"{path}: {'no such file' if not path.exists() else 'not a regular file'}")
    try:
        data = torch.load(str(path), weights_only=True)
    except Exception as e:
        raise LeankError(f"{path}: not a training-examples file (leank mask examples writes them)") from e
    if not isinstance(data, dict) or data.get("format") != "leank-train-examples":
        raise LeankError(f"{path}: not a training-examples file")
    tokens, offsets = data["tokens"].to(torch.int64).tolist(), data["offsets"].tolist()
    n = (len(offsets) - 1) // 2
    if n == 0:
        raise LeankError(f"{path}: holds no examples")

    def example(i: int) -> Example:
        j = 2 * (i % n)
        return Example(tokens[offsets[j] : offsets[j + 1]], tokens[offsets[j + 1] : offsets[j + 2]])

    return example


# --- the scaled-key cache -----------------------------------------------------------------------------
class ScaledKeyCache:
    """The answer tokens' view of a prefilled dense cache, with middle keys scaled per channel.

    Holds the answer tokens' own K/V (in the autograd graph) apart from the prefix (constant). `scale`
    (layers, Hkv, D) multiplies the channels of prefix keys in [sink, n - recent); None = no scaling.
    """

    def __init__(self, base: DenseCache, scale: torch.Tensor | None, sink: int, recent: int):
        self.base, self.scale = base, scale
        self.n = base.lengths[0]
        self.middle = (min(sink, self.n), max(min(sink, self.n), self.n - recent))
        self.k: list = [None] * base.n_layers
        self.v: list = [None] * base.n_layers

    @property
    def seq_len(self) -> int:
        return self.n + (0 if self.k[-1] is None else self.k[-1].shape[2])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k, v

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        B, Hq, T, D = q.shape
        kp, vp = self.base.k[layer][:, :, : self.n], self.base.v[layer][:, :, : self.n]
        H = kp.shape[1]
        qg = q.reshape(B, H, Hq // H * T, D).float()
        s0, s1 = self.middle
        scale = 1.0 / math.sqrt(D)
        kp = kp.float()
        parts = [torch.matmul(qg, kp[:, :, :s0].transpose(-1, -2))]
        if self.scale is not None:
            a = self.scale[layer].float()[None, :, None, :]  # (1, H, 1, D): scaling k's channels = scaling q's
            parts.append(torch.matmul(qg * a, kp[:, :, s0:s1].transpose(-1, -2)))
        else:
            parts.append(torch.matmul(qg, kp[:, :, s0:s1].transpose(-1, -2)))
        parts.append(torch.matmul(qg, kp[:, :, s1:].transpose(-1, -2)))
        kn = self.k[layer].float()
        own = torch.matmul(qg, kn.transpose(-1, -2)).view(B, H, Hq // H, T, T)
        own = own.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        scores = torch.cat(parts + [own.view(B, H, -1, T)], dim=-1) * scale
        p = torch.softmax(scores, dim=-1)
        out = torch.matmul(p[..., : self.n], vp.float()) + torch.matmul(p[..., self.n :], self.v[layer].float())
        return out.view(B, Hq, T, D).to(q.dtype)


# --- training -----------------------------------------------------------------------------------------
def schedule(step: int, steps: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up over the first `warmup` of steps, linear decay over the last."""
    w = max(1, int(steps * warmup))
    if step < w:
        return (step + 1) / w
    if step >= steps - w:
        return max(0.0, (steps - step) / w)
    return 1.0


def _hidden(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    return model.transformer(tokens, cache, logits_for="none")


def example_loss(model, ex: Example, alpha_eff: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """MSE between the full and the scaled model's final hidden states at the answer positions."""
    device = model.device
    prefix, answer = ex.prefix, ex.answer
    a = model.args
    base = DenseCache(a.n_layers, a.n_kv_heads, a.head_dim, device=device, dtype=model.dtype,
                      capacity=len(prefix))
    with torch.no_grad():
        _hidden(model, torch.tensor([prefix[:-1]], device=device), base)
        # the answer queries: the last prefix token and every answer token but the last (teacher forcing)
        queries = torch.tensor([[prefix[-1]] + answer[:-1]], device=device)
        target = _hidden(model, queries, ScaledKeyCache(base, None, config.sink_tokens, config.recent_tokens))
    scaled = _hidden(model, queries, ScaledKeyCache(base, alpha_eff, config.sink_tokens, config.recent_tokens))
    return F.mse_loss(scaled.float(), target.float())


def train_mask(model, config: TrainConfig, examples: Callable[[int], Example] | None = None,
               checkpoint: str | Path | None = None, resume: bool = False,
               progress: Callable[[dict], None] | None = None) -> tuple[Mask, list[dict]]:
    """Both stages (or those in `config.stages`); returns the binary mask and the loss history."""
    a = model.args
    check_binarize_args((a.n_layers, a.n_kv_heads, a.head_dim), config.ratio, config.align)
    if any(s not in (1, 2) for s in config.stages) or not config.stages:
        raise LeankError("stages must be 1, 2 or both")
    if config.steps < 1:
        raise LeankError("steps must be at least 1")

    if type(model.transformer.output) is not Linear:  # float16-packed or quantized: no gradients through it
        raise LeankError("training needs gradients through the model: load it with weights='float32' (CPU)")
    examples = examples or generated_examples(model, config)
    lr1 = config.learning_rate(a.arch)
    state = None
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise LeankError(f"--resume: no checkpoint at {checkpoint}")
        state = load_checkpoint(checkpoint, config, model)
    alpha = torch.nn.Parameter(torch.ones(a.n_layers, a.n_kv_heads, a.head_dim, device=model.device))
    history: list[dict] = []
    start_stage_index, start_step = 0, 0
    if state is not None:
        alpha.data.copy_(state.alpha.to(model.device))
        history = state.history
        start_stage_index = config.stages.index(state.stage)
        start_step = state.step
    for si in range(start_stage_index, len(config.stages)):
        stage = config.stages[si]
        lr = lr1 if stage == 1 else lr1 / 2
        lam = config.lam if stage == 1 else 0.0
        opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
        first = 0
        if state is not None and si == start_stage_index:
            first = start_step
            if state.optimizer:
                opt.load_state_dict(state.optimizer)
        for step in range(first, config.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr * schedule(step, config.steps, config.warmup)
            index = (stage - 1) * config.steps + step
            ex = examples(index)
            eff = alpha if stage == 1 else straight_through_mask(alpha, config.ratio, config.align)
            mse = example_loss(model, ex, eff, config)
            loss = mse + lam * alpha.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            record = {"stage": stage, "step": step + 1, "loss": float(loss.detach()), "mse": float(mse.detach()),
                      "mean_alpha": float(alpha.detach().mean()),
                      "near_zero": float((alpha.detach() < 0.05).float().mean()),
                      "tokens": len(ex.prefix) + len(ex.answer), "seconds": time.perf_counter() - t0}
            history.append(record)
            if progress:
                progress(record)
            done = step + 1
            if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(checkpoint, TrainState(stage, done, alpha.detach().cpu(), opt.state_dict(), history),
                                config, model)
        state = None
    kept = binarize_scores(alpha.detach().cpu(), config.ratio, config.align)

    prov = Provenance("learned", ratio=config.ratio, align=config.align, source=model.path.name,
                      steps=config.steps * len(config.stages),
                      extra={"fingerprint": k_fingerprint(model.file), "stages": list(config.stages),
                             "seed": config.seed, "max_tokens": config.max_tokens, "lambda": config.lam,
                             "lr": config.learning_rate(model.args.arch)})
    return Mask(kept, prov), history


# --- checkpoints ----------------------------------------------------------------------------------------
def _config_key(config: TrainConfig, model) -> dict:
    d = asdict(config)
    d.pop("checkpoint_every")
    d["stages"] = list(config.stages)
    d["model"] = model.path.name
    return d


def save_checkpoint(path: str | Path, state: TrainState, config: TrainConfig, model) -> None:
    with atomic_write(path, force=True, inputs=[model.path]) as tmp:
        torch.save({"format": "leank-train-checkpoint", "stage": state.stage, "step": state.step, "alpha": state.alpha,
                    "optimizer": state.optimizer, "history": state.history, "config": _config_key(config, model)},
                   str(tmp))


def load_checkpoint(path: str | Path, config: TrainConfig, model) -> TrainState:
    try:
        data = torch.load(str(path), weights_only=True, map_location="cpu")  # resumable on another device
    except Exception as e:
        raise LeankError(f"{path}: not a readable training checkpoint (damaged? --force starts over)") from e
    if not isinstance(data, dict) or data.get("format") != "leank-train-checkpoint":
        raise LeankError(f"{path}: not a leank training checkpoint")
    if data["config"] != _config_key(config, model):
        changed = sorted(k for k in data["config"] if data["config"].get(k) != _config_key(config, model).get(k))
        raise LeankError(f"{path}: was made with other settings ({', '.join(changed)}); resume with the same ones")
    stage, step = int(data["stage"]), int(data["step"])
    if step >= config.steps:  # the stage is complete: continue with the next one
        later = [s for s in config.stages if s > stage]
        if not later:
            return TrainState(stage, step, data["alpha"], data["optimizer"], data["history"])
        return TrainState(later[0], 0, data["alpha"], {}, data["history"])
    return TrainState(stage, step, data["alpha"], data["optimizer"], data["history"])
