"""The synthetic task generators: lengths in the model's tokens, needles where asked, disjoint splits."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import leank
from leank.errors import LeankError
from leank.masks.tasks import (SEED_SPAN, SPLITS, TASKS, TEMPLATES, make_sample, make_samples, random_samples,
                                 sample_seed)


@pytest.fixture(scope="module")
def tiny(make_tiny):
    return leank.load(make_tiny(context_length=4096), device="cpu")


def _first_needle_depth(model, sample) -> float:
    """Where the asked-for needle sits, measured afresh: tokens of the document before its first answer."""
    pos = sample.context.index(sample.answers[0])
    start = sample.context.rfind(". ", 0, pos) + 1  # the needle sentence starts after the previous sentence
    before = len(model.tokenize(sample.context[:start], add_special=False))
    return before / len(model.tokenize(sample.context, add_special=False))


@pytest.mark.parametrize("task", TASKS)
def test_sample_is_well_formed(tiny, task):
    s = make_sample(tiny, task, 2000, 0.5, seed=3)
    assert s.task == task and s.split == "eval" and s.prompt_ids == s.context_ids + s.question_ids
    for answer in s.answers:  # every answer is in the document, and not in the question
        assert answer in s.context and answer not in s.question
    # the question, the end of the user turn and the assistant header follow the document
    tail = tiny.tokenizer.detokenize(s.question_ids, special=True)
    assert tail.startswith("\n\n" + s.question) and "<|im_start|>assistant\n" in tail and tail.endswith(s.answer_prefix)
    # the ids are the chat template's tokens of the whole user turn, split after the document
    intro = next(t.intro for t in TEMPLATES[task]["eval"] if t.name == s.template)
    turn = tiny.chat_tokens([{"role": "user", "content": f"{intro}\n\n{s.context}\n\n{s.question}"}])
    assert s.prompt_ids == turn + tiny.tokenize(s.answer_prefix, add_special=False)
    # the expected reply, then the end of the turn
    assert tiny.tokenizer.detokenize(s.answer_ids, special=True) == " " + s.answer + "<|im_end|>"
    assert all(a in s.answer for a in s.answers)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.35, 1.0])
def test_length_and_depth(tiny, task, depth):
    length = 2400
    s = make_sample(tiny, task, length, depth, seed=1, index=int(depth * 100))
    # byte-level tokens: a filler sentence is up to ~110 tokens, and the length is met to half a sentence
    assert abs(s.prompt_tokens - length) <= 60
    measured = _first_needle_depth(tiny, s)
    assert measured == pytest.approx(s.needle_depths[0], abs=0.01)
    assert abs(measured - depth) <= 0.06


def test_same_arguments_same_sample(tiny):
    a = make_sample(tiny, "multivalue", 1500, 0.4, seed=5, index=2)
    b = make_sample(tiny, "multivalue", 1500, 0.4, seed=5, index=2)
    c = make_sample(tiny, "multivalue", 1500, 0.4, seed=5, index=3)
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert c.answers != a.answers and c.context != a.context


def test_samples_do_not_depend_on_the_hash_seed(tiny):
    """Same arguments, another process with another PYTHONHASHSEED: the same prompt."""
    code = ("import sys, leank; from leank.masks.tasks import make_sample; "
            "m = leank.load(sys.argv[1], device='cpu'); s = make_sample(m, 'vartrack', 1500, 0.3, seed=2); "
            "print(s.answers, s.prompt_ids == eval(sys.argv[2]))")
    here = make_sample(tiny, "vartrack", 1500, 0.3, seed=2)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    r = subprocess.run([sys.executable, "-c", code, str(tiny.path), repr(here.prompt_ids)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{here.answers} True"


def test_random_training_stream(tiny):
    stream = random_samples(tiny, ["multikey", "multivalue"], 1400, 2000, seed=9)
    drawn = [next(stream) for _ in range(4)]
    assert [s.task for s in drawn] == ["multikey", "multivalue"] * 2
    assert all(s.split == "train" and s.seed >= SEED_SPAN and 1400 <= s.length <= 2000 for s in drawn)
    assert len({s.length for s in drawn}) > 1 and len({s.seed for s in drawn}) == 4


def test_splits_never_share_seeds_or_templates(tiny):
    for task in TASKS:
        eval_t, train_t = TEMPLATES[task]["eval"], TEMPLATES[task]["train"]
        assert eval_t and train_t
        for field in ("name", "intro", "needle", "question", "answer_prefix"):
            assert not {getattr(t, field) for t in eval_t} & {getattr(t, field) for t in train_t}, (task, field)
    for seed in (0, 1, 12345, 2**40):
        for index in (0, 1, 999):
            assert 0 <= sample_seed("eval", seed, index) < SEED_SPAN <= sample_seed("train", seed, index) < 2 * SEED_SPAN
    made = {split: list(make_samples(tiny, TASKS, [1800], [0.2, 0.7], 2, seed=0, split=split)) for split in SPLITS}
    seeds = {split: {s.seed for s in made[split]} for split in SPLITS}
    assert len(seeds["eval"]) == len(made["eval"]) and not seeds["eval"] & seeds["train"]
    eval_names = {n for t in TASKS for n in (x.name for x in TEMPLATES[t]["eval"])}
    assert {s.template for s in made["eval"]} <= eval_names
    assert not {s.template for s in made["train"]} & eval_names
    contexts = {s.context for s in made["eval"]}
    assert not any(s.context in contexts for s in made["train"])


def test_repeat_haystack_and_options(tiny):
    s = make_sample(tiny, "multikey", 2000, 0.5, haystack="repeat", keys=3)
    assert s.haystack == "repeat" and "The " in s.context and s.context.count("special magic uuids for") == 3
    v = make_sample(tiny, "vartrack", 1500, 0.1, hops=2, chains=1)
    assert len(v.answers) == 3 and v.context.count("VAR ") == 3 + 2  # 3 statements, 2 of them copies


def test_bad_requests_fail_clearly(tiny):
    with pytest.raises(LeankError, match="unknown task"):
        make_sample(tiny, "haystack", 1000)
    with pytest.raises(LeankError, match="too short"):
        make_sample(tiny, "multikey", 300)
    with pytest.raises(LeankError, match="exceeds the model's context"):
        make_sample(tiny, "passkey", 5000)
    with pytest.raises(LeankError, match="depth"):
        make_sample(tiny, "passkey", 1000, 1.5)
    with pytest.raises(LeankError, match="split"):
        make_sample(tiny, "passkey", 1000, split="test")
    with pytest.raises(LeankError, match="haystack"):
        make_sample(tiny, "passkey", 1000, haystack="lorem")


@pytest.mark.slow
def test_default_model_lengths_and_speed(default_model):
    make_sample(default_model, "passkey", 1024)  # warm the faker pools
    for task in TASKS:
        for length in (1024, 4096, 7300):
            t0 = time.perf_counter()
            s = make_sample(default_model, task, length, 0.5, index=length)
            seconds = time.perf_counter() - t0
            assert abs(s.prompt_tokens - length) <= 16, (task, length, s.prompt_tokens)
            assert seconds < 1.0, (task, length, seconds)
            # a needle is ~20 tokens (a UUID pair ~60): another may have taken the nearest boundary
            tolerance = 0.02 + (0 if task == "passkey" else 64 / length)
            assert abs(_first_needle_depth(default_model, s) - 0.5) <= tolerance, (task, length)
