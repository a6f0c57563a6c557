"""Sampling: min-p and llama.cpp's repetition penalties (`leank.runtime.generate`), checked against the
rules written out by hand."""
from __future__ import annotations

import math

import torch

from leank.runtime.generate import SamplingParams, apply_penalties, sample


def test_penalties_follow_llama_cpp_rules():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    history = [0, 1, 1, 3, 3, 3]
    p = SamplingParams(repeat_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5, repeat_last_n=64)
    out = apply_penalties(logits, history, p)
    # seen once (0), twice (1), three times (3); 2 and 4 unseen
    expected = [2.0 / 2 - 0.25 - 0.5 * 1, -1.0 * 2 - 0.25 - 0.5 * 2, 0.5, 3.0 / 2 - 0.25 - 0.5 * 3, 0.0]
    assert torch.allclose(out, torch.tensor(expected))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0]))  # the input is not modified


def test_penalties_look_only_at_the_last_n_tokens():
    logits = torch.tensor([1.0, 1.0, 1.0])
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    out = apply_penalties(logits, [0, 1, 2], p)  # token 0 is outside the window
    assert out.tolist() == [1.0, 0.5, 0.5]
    assert apply_penalties(logits, [0, 1, 2], SamplingParams(repeat_last_n=2)) is logits  # defaults: off


def test_repeat_penalty_changes_a_greedy_choice():
    logits = torch.tensor([5.0, 4.0, 0.0])
    assert sample(logits, SamplingParams(temperature=0), None, history=[0]) == 0
    assert sample(logits, SamplingParams(temperature=0, repeat_penalty=1.5), None, history=[0]) == 1


def test_min_p_drops_unlikely_tokens_at_temperature_one():
    # probabilities at temperature 1: p(1)/p(0) = e^-2 = 0.135, p(2)/p(0) = e^-5 = 0.0067
    logits = torch.tensor([5.0, 3.0, 0.0])
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.1)  # a high temperature flattens the rest
    seen = {sample(logits, p, g) for _ in range(400)}
    assert seen == {0, 1}  # token 2 is below 0.1 x the top probability: never drawn
    p_off = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0)
    assert 2 in {sample(logits, p_off, g) for _ in range(400)}  # without min-p it is drawn (p ~ 0.19)
    assert math.isclose(SamplingParams().min_p, 0.05)  # llama.cpp's default
