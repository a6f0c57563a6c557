"""The evaluation runner: policy SPECs, scoring, the prefill-once protocol, the CLI, and the real model."""
from __future__ import annotations

import json

import pytest

import leank
from leank.errors import LeankError
from leank.masks.evaluate import decode_perplexity, evaluate, found, run_sample, score_reply, summarize
from leank.masks.choose import parse_policies, parse_policy
from leank.masks.tasks import make_sample


@pytest.fixture(scope="module")
def tiny(make_tiny):
    return leank.load(make_tiny(head_dim=32, context_length=2048), device="cpu")


def test_policy_specs(tiny):
    dense = parse_policy("dense", tiny)
    assert dense.is_dense
    k4 = parse_policy("kivi4", tiny)
    assert (k4.kind, k4.k_bits, k4.v_bits, k4.mask) == ("kivi", 4, 4, None)
    k42 = parse_policy("kivi4/2", tiny)
    assert (k42.k_bits, k42.v_bits) == (4, 2)
    lk = parse_policy("leank:freq:0.5", tiny)
    assert lk.kind == "leank" and lk.k_bits == 16 and lk.mask.kept_fraction == pytest.approx(0.5)
    lq = parse_policy("leank:freq:0.5+kivi2", tiny, sink_tokens=8, recent_tokens=64)
    assert lq.kind == "leank+kivi" and lq.k_bits == lq.v_bits == 2 and lq.mask.kept_fraction == pytest.approx(0.5)
    assert (lq.sink_tokens, lq.recent_tokens) == (8, 64)
    over = parse_policy("kivi2,recent=32,sink=4,group=16", tiny, sink_tokens=8, recent_tokens=64)
    assert (over.sink_tokens, over.recent_tokens, over.group_size) == (4, 32, 16)
    ones = parse_policy("leank:ones", tiny)
    assert not ones.is_dense and ones.mask.kept_fraction == 1.0
    assert list(parse_policies(["dense", "kivi2"], tiny)) == ["dense", "kivi2"]


@pytest.mark.parametrize("spec, message", [
    ("kivi3", "2, 4 or 8"),
    ("kivi", "kiviN"),
    ("leank:", "expected dense"),
    ("fp8", "expected dense"),
    ("kivi4,window=3", "not an option"),
    ("leank:nowhere.safetensors+kivi4", "no such file"),
    ("kivi2,group=24", "group_size"),
])
def test_bad_policy_specs(tiny, spec, message):
    with pytest.raises(LeankError, match=message):
        parse_policies([spec], tiny)


def test_scoring_is_whole_word():
    assert found("12345", "The pass key is 12345.")
    assert not found("12345", "The pass key is 123456.")
    assert not found("ab-12", "xab-12")
    assert score_reply("1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333", "4444444"]) == 0.75


def test_protocol_matches_plain_generation(tiny):
    """Dense replies equal ordinary greedy generation of the whole prompt; a compressed cache that keeps
    every channel unquantized (leank:ones) gives the same reply; the rewound dense cache serves twice."""
    s = make_sample(tiny, "passkey", 700, 0.3, seed=4)
    policies = parse_policies(["dense", "leank:ones,sink=16,recent=64", "kivi2,sink=16,recent=64", "dense,sink=4"],
                              tiny)
    replies = run_sample(tiny, s, policies)
    budget = len(s.answer_ids) + 8
    plain = "".join(tiny.generate(s.prompt_ids, max_tokens=budget, temperature=0, policy=policies["dense"]))
    assert replies["dense"].text == plain.strip().split("\n")[0]
    assert replies["leank:ones,sink=16,recent=64"].text == replies["dense"].text
    assert replies["dense,sink=4"].text == replies["dense"].text
    assert replies["dense"].middle_tokens == 0
    assert replies["kivi2,sink=16,recent=64"].middle_tokens >= len(s.context_ids) - 16 - 64 - 32
    for r in replies.values():
        assert 0 < r.tokens <= budget and 0.0 <= r.score <= 1.0 and r.correct == (r.score == 1.0)
    # LeanK's protocol: document and question prefilled together; dense is the same generation
    prefilled = run_sample(tiny, s, policies, protocol="prefill")
    assert prefilled["dense"].text == replies["dense"].text == prefilled["leank:ones,sink=16,recent=64"].text
    assert prefilled["kivi2,sink=16,recent=64"].middle_tokens >= replies["kivi2,sink=16,recent=64"].middle_tokens
    with pytest.raises(LeankError, match="protocol"):
        run_sample(tiny, s, policies, protocol="chat")


def test_evaluate_two_policies_end_to_end(tiny):
    samples = [make_sample(tiny, "passkey", 600, 0.5, index=0), make_sample(tiny, "multivalue", 800, 0.2, index=1)]
    policies = parse_policies(["dense", "leank:freq:0.5+kivi4,sink=16,recent=64"], tiny)
    seen = []
    records = evaluate(tiny, samples, policies, progress=lambda done, total, what: seen.append((done, total)))
    assert seen[-1] == (4, 4) and len(records) == 2
    for rec, s in zip(records, samples):
        assert rec["task"] == s.task and rec["prompt_tokens"] == s.prompt_tokens and rec["answers"] == s.answers
        assert set(rec["replies"]) == set(policies)
        for r in rec["replies"].values():
            assert isinstance(r["reply"], str) and r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    rows = summarize(records, list(policies))
    assert [(r["task"], r["length"], r["samples"]) for r in rows] == [("passkey", 600, 1), ("multivalue", 800, 1)]
    for row in rows:
        assert set(row["accuracy"]) == set(policies) and all(0 <= v <= 100 for v in row["accuracy"].values())
    json.dumps(records)  # JSON-ready


def test_decode_perplexity_per_policy(tiny):
    ids = tiny.tokenize("The river runs to the sea and the road winds through the hills. " * 3)[:130]
    ppl = decode_perplexity(tiny, ids, parse_policies(["dense", "leank:ones,sink=8,recent=32", "kivi2,sink=8,recent=32"],
                                                      tiny), decode_from=16)
    assert ppl["leank:ones,sink=8,recent=32"]["perplexity"] == pytest.approx(ppl["dense"]["perplexity"], rel=1e-4)
    assert ppl["kivi2,sink=8,recent=32"]["perplexity"] != ppl["dense"]["perplexity"]
    assert ppl["kivi2,sink=8,recent=32"]["cache"]["middle_k"] > 0 and ppl["dense"]["scored"] == len(ids) - 1
    # the decoded tokens alone: the 15 prefilled targets are shared by every policy, so the gap can only widen
    assert ppl["dense"]["decoded"] == len(ids) - 1 - 16
    dense, kivi = ppl["dense"], ppl["kivi2,sink=8,recent=32"]
    assert abs(kivi["decode_nll"] - dense["decode_nll"]) >= abs(kivi["nll"] - dense["nll"]) > 0


def test_cli_eval_writes_table_and_json(tiny, tmp_path, leank_cli):
    text = tmp_path / "text.txt"
    text.write_text("Leaves fall in autumn and the wind is cold. " * 20)
    out = tmp_path / "r.json"
    r = leank_cli("eval", str(tiny.path), "--task", "passkey", "--length", "600", "--depth", "0.4", "--policy", "dense",
               "--policy", "kivi2", "--sink", "16", "--recent", "64", "--json-out", str(out), "--ppl-file", str(text),
               "--ppl-ctx", "120", "--ppl-prefix", "16", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "passkey" in r.stdout and "kivi2" in r.stdout and "decode ppl" in r.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["seed"] == 7 and data["settings"]["policies"]["kivi2"]["recent_tokens"] == 64
    assert len(data["samples"]) == 1 and set(data["samples"][0]["replies"]) == {"dense", "kivi2"}
    assert set(data["perplexity"]) == {"dense", "kivi2"} and data["summary"][0]["samples"] == 1


def test_cli_eval_errors_are_one_line(tiny, leank_cli):
    r = leank_cli("eval", str(tiny.path), "--policy", "kivi5")  # a malformed SPEC: a usage error
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "kivi5" in r.stderr
    r = leank_cli("eval", str(tiny.path), "--length", "99999")
    assert r.returncode == 1 and "context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_retrieves_a_passkey(default_model):
    """SmolLM2-135M-Instruct finds a 5-digit pass key at ~1K tokens with a dense cache (llama.cpp does too)."""
    policies = parse_policies(["dense"], default_model)
    for depth, index in ((0.25, 0), (0.75, 1)):
        s = make_sample(default_model, "passkey", 1024, depth, index=index)
        reply = run_sample(default_model, s, policies)["dense"]
        assert reply.correct, (depth, s.answers, reply.text)
