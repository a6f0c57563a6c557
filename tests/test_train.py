"""LeanK mask training on tiny random models: the loss falls, the mask has the asked ratio and alignment,
and resuming from a checkpoint continues exactly."""
import random

import pytest
import torch

import leank
from leank.masks.train import Example, ScaledKeyCache, TrainConfig, example_loss, load_examples, save_examples, train_mask
from leank.runtime.cache.dense import DenseCache


@pytest.fixture(scope="module")
def model(make_tiny):
    return leank.load(make_tiny(arch="llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=32),
                      device="cpu", weights="float32")


def random_examples(vocab: int, seed: int = 0):
    def example(i: int) -> Example:
        rng = random.Random(seed * 7919 + i)
        n = rng.randint(120, 200)
        return Example([rng.randrange(vocab - 3) for _ in range(n)], [rng.randrange(vocab - 3) for _ in range(6)])

    return example


def config(**kw):
    base = dict(ratio=0.5, align=8, steps=6, lr=0.05, lam=0.5, min_tokens=100, max_tokens=200, sink_tokens=8,
                recent_tokens=16, checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_unscaled_view_matches_the_model(model):
    """With no scaling, the answer tokens on top of the prefilled cache compute what a plain run does."""
    ex = random_examples(model.args.vocab_size)(0)
    ids = ex.prefix + ex.answer
    a = model.args
    with torch.no_grad():
        full = model.transformer(torch.tensor([ids]), model.new_cache(), logits_for="none")[0, len(ex.prefix) - 1 : -1]
        base = DenseCache(a.n_layers, a.n_kv_heads, a.head_dim)
        model.transformer(torch.tensor([ex.prefix[:-1]]), base, logits_for="none")
        view = ScaledKeyCache(base, None, 8, 16)
        part = model.transformer(torch.tensor([[ex.prefix[-1]] + ex.answer[:-1]]), view, logits_for="none")[0]
    # the plain run's cache holds the answer tokens' K/V as float16 on CPU (`kv_dtype`), the view keeps
    # them float32 for autograd: equal up to that rounding
    tol = 1e-5 if base.kv_dtype == torch.float32 else 1e-4  # measured: 2.3e-5
    print(f"max difference {(full - part).abs().max():.2e}")
    assert torch.allclose(full, part, atol=tol)


def test_loss_is_zero_at_alpha_one_and_grows_when_channels_go(model):
    ex = random_examples(model.args.vocab_size)(1)
    a = model.args
    ones = torch.ones(a.n_layers, a.n_kv_heads, a.head_dim)
    assert float(example_loss(model, ex, ones, config())) < 1e-10
    assert float(example_loss(model, ex, ones * 0.2, config())) > 1e-6


def test_training_reduces_the_loss_and_respects_ratio_and_alignment(model, tmp_path):
    cfg = config(steps=8)
    mask, history = train_mask(model, cfg, random_examples(model.args.vocab_size))
    stage1 = [h["loss"] for h in history if h["stage"] == 1]
    assert stage1[-1] < stage1[0]
    assert len(history) == 16
    counts = mask.kept_counts()
    assert bool((counts % 8 == 0).all())
    assert abs(mask.kept_fraction - 0.5) <= 8 / (2 * model.args.head_dim) + 1e-9
    assert mask.provenance.method == "learned" and mask.provenance.align == 8
    assert mask.provenance.extra["fingerprint"].startswith("sha256:")


def test_resume_continues_exactly(model, tmp_path):
    cfg = config(steps=6, checkpoint_every=2)
    data = random_examples(model.args.vocab_size, seed=3)
    straight, h1 = train_mask(model, cfg, data)
    ckpt = tmp_path / "ckpt.pt"
    # stop after stage 1, step 4 (a checkpoint boundary), then resume
    partial = config(steps=6, checkpoint_every=2, stages=(1, 2))

    class Stop(Exception):
        pass

    def stop_at(record):
        if record["stage"] == 1 and record["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        train_mask(model, partial, data, checkpoint=ckpt, progress=stop_at)
    resumed, h2 = train_mask(model, partial, data, checkpoint=ckpt, resume=True)
    assert resumed == straight
    assert [round(h["loss"], 10) for h in h2] == [round(h["loss"], 10) for h in h1]


def test_resume_refuses_other_settings(model, tmp_path):
    ckpt = tmp_path / "c.pt"
    data = random_examples(model.args.vocab_size)
    train_mask(model, config(steps=2, stages=(1,)), data, checkpoint=ckpt)
    with pytest.raises(leank.LeankError, match="ratio"):
        train_mask(model, config(steps=2, stages=(1,), ratio=0.25), data, checkpoint=ckpt, resume=True)


def test_examples_file_round_trip(model, tmp_path):
    gen = random_examples(model.args.vocab_size)
    exs = [gen(i) for i in range(3)]
    save_examples(exs, tmp_path / "ex.pt")
    back = load_examples(tmp_path / "ex.pt")
    assert [back(i) for i in range(3)] == exs


def test_shipped_masks_are_found_for_the_default_model_only(default_model_path, tiny_llama):
    from leank.masks.shipped import shipped_mask
    from leank.runtime.engine import open_header
    from leank.masks.choose import build_policy

    h = open_header(default_model_path)
    m7, m5 = shipped_mask(h), shipped_mask(h, 0.5)
    assert m7.provenance.method == "learned" and m7.provenance.ratio == pytest.approx(0.7)
    assert m5.provenance.ratio == pytest.approx(0.5) and m5 != m7
    for mask in (m5, m7):
        assert bool((mask.kept_counts() % 16 == 0).all())
    assert build_policy(h, kv="leank").mask == m7  # the default for --kv leank
    assert build_policy(h, kv="leank", ratio=0.5).mask == m5
    assert build_policy(h, kv="leank", ratio=0.6).mask.provenance.method == "freq"
    assert shipped_mask(open_header(tiny_llama)) is None
