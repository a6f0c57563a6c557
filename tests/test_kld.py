"""KL divergence against dense (`kl_divergence`, `leank perplexity --kld`) and the Hadamard-rotated cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import leank
from leank.errors import LeankError
from leank.kernels.quant import hadamard
from leank.masks.choose import parse_policies, parse_policy
from leank.masks.evaluate import divergence_stats, kl_divergence
from leank.runtime.cache.compressed import key_rotation
from leank.runtime.decode import Decode

SMALL = "sink=4,recent=16"  # so that most of a 120-token text is in the middle region


@pytest.fixture(scope="module")
def tiny(make_tiny):
    return leank.load(make_tiny(head_dim=32, context_length=2048), device="cpu")


def text_ids(model, n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist()


def test_divergence_stats_against_torch_kl_div():
    g = torch.Generator().manual_seed(3)
    ref, other = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    targets = torch.randint(0, 50, (7,), generator=g)
    d = divergence_stats(ref, other, targets)
    expect = F.kl_div(F.log_softmax(other.double(), -1), F.log_softmax(ref.double(), -1), log_target=True,
                      reduction="none").sum(-1)
    assert torch.allclose(d["kld"], expect, atol=1e-12) and (d["kld"] > 0).all()
    assert torch.equal(d["top1"], ref.argmax(-1) == other.argmax(-1))
    assert torch.allclose(d["nll"], F.cross_entropy(other.double(), targets, reduction="none"))
    same = divergence_stats(ref, ref)
    assert same["kld"].abs().max() < 1e-12 and same["top1"].all()


def test_kld_of_a_quantized_cache_matches_its_own_decode(tiny):
    ids = text_ids(tiny, 120)
    policies = parse_policies([f"kivi2,{SMALL}", f"leank:ones,{SMALL}"], tiny)
    r = kl_divergence(tiny, ids, policies, decode_from=20, reference="decode")
    q, lossless = r[f"kivi2,{SMALL}"], r[f"leank:ones,{SMALL}"]
    assert q["positions"] == lossless["positions"] == 120 - 1 - 20
    assert q["cache"]["middle_tokens"] > 64  # the middle region was really compared
    # a compressed cache that keeps everything exactly is dense; 2-bit codes are not
    # (a random tiny model's distributions are nearly flat: small divergences, but far from rounding's)
    assert lossless["kld_mean"] < 1e-11 and lossless["top1_agreement"] == 1.0
    assert q["kld_mean"] > 1e-8 and q["kld_mean"] > 1000 * lossless["kld_mean"] and q["kld_p99"] >= q["kld_median"] and q["kld_max"] >= q["kld_p99"]
    # the policy's NLL on the same positions is what `perplexity --decode` measures through one cache
    ppl = tiny.perplexity(ids, decode_from=20, policy=policies[f"kivi2,{SMALL}"])
    assert q["decode_perplexity"] == pytest.approx(ppl["decode_perplexity"], rel=1e-5)
    dense = tiny.perplexity(ids, decode_from=20)
    assert q["dense_decode_perplexity"] == pytest.approx(dense["decode_perplexity"], rel=1e-5)
    # and the KL divergence is the one of the logits a policy's own decode produces
    cache = tiny.new_cache(policy=policies[f"kivi2,{SMALL}"])
    rows, feed = [], iter(ids[20:])
    first = tiny.transformer(torch.tensor([ids[:20]]), cache, logits_for="last")[0, -1].float()

    def teacher(logits):
        rows.append(logits)
        return next(feed)

    for _ in Decode(tiny.transformer, cache, [], teacher, max_tokens=len(ids) - 20, context_length=2048, logits=first):
        pass
    mine = torch.stack(rows[1 : len(ids) - 20])  # the logits after each fed token but the last
    ref = tiny.logits(ids[:-1])[20:]
    assert divergence_stats(ref, mine)["kld"].mean().item() == pytest.approx(q["kld_mean"], rel=1e-4)


def test_prefill_reference_equals_decode_reference(tiny):
    ids = text_ids(tiny, 100, seed=2)
    policies = parse_policies([f"kivi2,{SMALL}"], tiny)
    a = kl_divergence(tiny, ids, policies, decode_from=10, reference="decode")[f"kivi2,{SMALL}"]
    b = kl_divergence(tiny, ids, policies, decode_from=10, reference="prefill")[f"kivi2,{SMALL}"]
    assert a["kld_mean"] == pytest.approx(b["kld_mean"], rel=1e-4, abs=1e-7)
    assert a["top1_agreement"] == b["top1_agreement"]


def test_kld_refuses_dense_and_short_texts(tiny):
    with pytest.raises(LeankError, match="nothing to compare"):
        kl_divergence(tiny, text_ids(tiny, 50), parse_policies(["dense"], tiny))
    with pytest.raises(LeankError, match="fewer than the 64-token prefix"):
        kl_divergence(tiny, text_ids(tiny, 65), parse_policies(["kivi2"], tiny), decode_from=64)
    with pytest.raises(LeankError, match="reference"):
        kl_divergence(tiny, text_ids(tiny, 80), parse_policies(["kivi2"], tiny), reference="guess")


# --- the Hadamard rotation ----------------------------------------------------------------------------------
def test_hadamard_is_orthonormal_and_refuses_other_orders():
    for n in (1, 2, 16, 64, 128):
        h = hadamard(n, torch.float64)
        assert torch.allclose(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-12) and torch.equal(h, h.T)
    with pytest.raises(ValueError):
        hadamard(48)


def test_key_rotation_keeps_the_kept_channels_dot_products():
    g = torch.Generator().manual_seed(5)
    kept = torch.zeros(3, 64, dtype=torch.bool)
    for h, c in enumerate((0, 48, 16)):
        kept[h, torch.randperm(64, generator=g)[:c]] = True
    rot = key_rotation(kept).double()
    q, k = torch.randn(3, 5, 64, generator=g).double(), torch.randn(3, 7, 64, generator=g).double()
    qr, kr = q @ rot, k @ rot
    for h in range(3):
        idx = kept[h].nonzero().flatten()
        assert torch.allclose(qr[h] @ kr[h].T, q[h] @ k[h].T, atol=1e-10)  # every channel: orthonormal
        assert torch.allclose(qr[h][:, idx] @ kr[h][:, idx].T, q[h][:, idx] @ k[h][:, idx].T, atol=1e-10)
        if idx.numel():
            assert not torch.allclose(kr[h][:, idx], k[h][:, idx])  # it does rotate the kept channels
        assert torch.equal(kr[h][:, ~kept[h]], k[h][:, ~kept[h]])  # pruned channels are left alone


def test_rotated_cache_is_exact_without_quantization_and_differs_with_it(tiny):
    ids = text_ids(tiny, 110, seed=4)
    base = "leank:freq:0.5"  # pruned and rotated: the kept channels' scores must survive the rotation
    specs = [f"{base},{SMALL}", f"{base},{SMALL},rotate=1", f"{base}+kivi2,{SMALL}", f"{base}+kivi2,{SMALL},rotate=1"]
    policies = parse_policies(specs, tiny)
    assert policies[specs[1]].rotate and not policies[specs[0]].rotate
    r = kl_divergence(tiny, ids, policies, decode_from=10)
    assert r[specs[1]]["kld_mean"] == pytest.approx(r[specs[0]]["kld_mean"], rel=1e-3, abs=1e-9)
    # equal up to storage rounding: the CPU cache keeps unquantized K/V in float16, rounded in either basis
    assert r[specs[1]]["decode_perplexity"] == pytest.approx(r[specs[0]]["decode_perplexity"], rel=1e-4)
    assert r[specs[3]]["kld_mean"] > 1e-8 and r[specs[3]]["kld_mean"] != pytest.approx(r[specs[2]]["kld_mean"], rel=1e-3)


def test_rotate_option_is_checked(tiny):
    with pytest.raises(LeankError, match="rotate is 0 or 1"):
        parse_policy("kivi2,rotate=2", tiny)
    assert not parse_policy("kivi2,rotate=0", tiny).rotate


# --- the command ------------------------------------------------------------------------------------------
def run(*args):
    return subprocess.run([sys.executable, "-m", "leank.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, COLUMNS="200"))  # a loaded 2-core VM took over 300 s


def test_perplexity_kld_command(make_tiny, tmp_path):
    model = make_tiny(head_dim=32, context_length=2048)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} thing{i % 11}" for i in range(400)))
    r = run("perplexity", model, "--file", text, "--ctx", "120", "--prefix", "16", "--kld", "--kv", "kivi",
            "--sink", "4", "--recent", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "kld" and out["positions"] == 120 - 1 - 16 and out["kld_mean"] > 0
    assert 0 <= out["top1_agreement"] <= 1 and out["kld_p99"] >= out["kld_median"]
    dense = run("perplexity", model, "--file", text, "--ctx", "120", "--kld", "--kv", "dense")
    assert dense.returncode != 0 and "nothing to compare" in dense.stderr and "Traceback" not in dense.stderr
    short = run("perplexity", model, "--file", text, "--ctx", "40", "--prefix", "64", "--kld", "--kv", "kivi")
    assert short.returncode != 0 and "prefix" in short.stderr and "Traceback" not in short.stderr


def test_rotation_survives_conversion(make_tiny, tmp_path):
    from leank.convert.convert import convert
    from leank.runtime.engine import open_header

    src = make_tiny(head_dim=32, context_length=2048)
    convert(src, tmp_path / "rot.gguf", "freq:0.5", k_bits=4, v_bits=2, rotate=True)
    convert(src, tmp_path / "plain.gguf", "freq:0.5", k_bits=4, v_bits=2)
    rot, plain = open_header(tmp_path / "rot.gguf").policy, open_header(tmp_path / "plain.gguf").policy
    assert rot.rotate and (rot.k_bits, rot.v_bits) == (4, 2) and not plain.rotate
    assert parse_policy("kivi2", leank.load(tmp_path / "rot.gguf", device="cpu")).rotate  # the file's choice carries


def test_logits_from_start_are_the_rows_of_the_whole_pass(tiny):
    ids = text_ids(tiny, 90, seed=6)
    whole = tiny.logits(ids)
    cache = tiny.new_cache()
    tail = tiny.logits(ids, cache, start=70)
    assert tail.shape == (20, whole.shape[1]) and torch.equal(tail, whole[70:])
    assert cache.seq_len == 90  # every token went through the model, only the asked rows were kept
    for bad in (-1, 90):
        with pytest.raises(LeankError, match="start must be within"):
            tiny.logits(ids, start=bad)
