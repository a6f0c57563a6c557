"""The device-length decode step (`leank.runtime.graph`) on the CPU: what a CUDA-graph replay computes,
op by op, equals the ordinary step on a real (tiny) model, across blocks moving into the middle region,
with the rows past each length poisoned. The capture itself is tested on CUDA (test_graph_gpu.py)."""
import pytest
import torch

import leank
from test_compressed_cache import random_mask  # tests/
from leank.runtime import decode, graph
from leank.runtime.cache.compressed import CompressedCache
from leank.runtime.cache.dense import DenseCache
from leank.runtime.cache.policy import CachePolicy

POLICIES = {
    "dense": None,
    "kivi2": dict(k_bits=2, v_bits=2, group_size=16),
    "leank-kivi2": dict(k_bits=2, v_bits=2, group_size=16, mask=True),
    "leank-k4v2-rotated": dict(k_bits=4, v_bits=2, group_size=16, mask=True, rotate=True),
    "leank-fp16": dict(mask=True, group_size=16),
}


def policy_for(name, args):
    spec = POLICIES[name]
    if spec is None:
        return None
    spec = dict(spec)
    if spec.pop("mask", False):  # a head that keeps nothing, one that keeps everything, the rest random
        spec["mask"] = random_mask(args.n_layers, args.n_kv_heads, args.head_dim, align=16,
                                   generator=torch.Generator().manual_seed(3))
    return CachePolicy(sink_tokens=8, recent_tokens=16, block_tokens=16, **spec)


def poison_spare(cache) -> None:
    """NaN in every full-region row past the cache's length: a step must never read them."""
    if isinstance(cache, DenseCache):
        for k, v, n in zip(cache.k, cache.v, cache.lengths):
            k[:, :, n:] = float("nan")
            v[:, :, n:] = float("nan")
        return
    for st in cache.layers:
        st.full_k[:, :, st.full_len:] = float("nan")
        st.full_v[:, :, st.full_len:] = float("nan")


@pytest.mark.parametrize("name", list(POLICIES))
def test_static_step_equals_the_ordinary_step(make_tiny, name):
    path = make_tiny(arch="llama", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
    m = leank.load(path, device="cpu")
    policy = policy_for(name, m.args)
    ours, theirs = m.new_cache(policy=policy), m.new_cache(policy=policy)
    if isinstance(ours, CompressedCache):
        assert ours.policy.rotate == (name == "leank-k4v2-rotated")
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, m.args.vocab_size, (1, 21), generator=gen)
    decode.prefill(m.transformer, ours, prompt)
    decode.prefill(m.transformer, theirs, prompt)
    worst, agree = 0.0, 0
    for i in range(90):  # 21 + 90 tokens: several blocks of 16 move into the middle region
        token = torch.randint(0, m.args.vocab_size, (1,), generator=gen)
        with torch.inference_mode():  # the cache's tensors are inference tensors
            ours.static_prepare()
            poison_spare(ours)
        a = graph.static_step(m.transformer, ours, token)
        b = decode.prefill(m.transformer, theirs, token.view(1, 1))
        assert torch.isfinite(a).all()
        assert ours.seq_len == theirs.seq_len == 22 + i
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        agree += int(a.argmax() == b.argmax())
    # rotated: the static append rotates each token as it comes, the ordinary one a whole prompt at once
    # (other matmul shapes, other last bits), so a stored 2-bit code can flip (1.03e-3 on the 2-core VM)
    tol = 5e-3 if isinstance(ours, CompressedCache) and ours.policy.rotate else 1e-4
    assert worst <= tol and agree == 90
    if isinstance(ours, CompressedCache):
        assert ours.layers[0].middle_len >= 64 and ours.layers[0].middle_len == theirs.layers[0].middle_len
        # layer 0's keys and values come from the embeddings alone: its middle region is the same bytes
        # (later layers see attention outputs that differ in the last bits: C kernels vs the reference)
        sa, sb = ours.layers[0], theirs.layers[0]
        for ga, gb in zip(sa.groups, sb.groups):
            M = sa.middle_len
            assert torch.equal(ga.k[:, :, :M], gb.k[:, :, :M]) and torch.equal(ga.v[:, :, :M], gb.v[:, :, :M])


def test_no_graph_on_the_cpu(make_tiny):
    m = leank.load(make_tiny(), device="cpu")
    assert graph.graph_step(m.transformer, m.new_cache()) is None


def test_compressed_capacity_reserves_the_middle_region():
    from types import SimpleNamespace

    args = SimpleNamespace(n_layers=1, n_kv_heads=2, head_dim=32, n_heads=2)
    policy = CachePolicy(k_bits=2, v_bits=2, group_size=16, sink_tokens=8, recent_tokens=16, block_tokens=16)
    cache = CompressedCache(policy, args, capacity=1000)
    k = torch.randn(1, 2, 60, 32)
    with torch.inference_mode():
        cache.append(0, k, k)
        cache.attend(0, torch.randn(1, 2, 60, 32))
    (g,) = cache.layers[0].groups
    assert cache.layers[0].middle_len == 32 and g.k.shape[2] == 1000 - 8 and g.k_scale.shape[2] == (1000 - 8) // 16


def test_info_names_the_cuda_decode_step_path(monkeypatch):
    """`leank info`'s matrices line on CUDA says whether steps are fused and replayed, and how to turn
    each off (its wording is what a user reads: checked here without a GPU)."""
    from leank.runtime.model import linear

    monkeypatch.setattr(linear, "cuda_blocks_for", lambda t: t in ("Q4_K", "Q6_K"))
    cuda = torch.device("cuda")
    line = linear.weights_path({"Q4_K": 3, "Q6_K": 1, "F32": 5}, cuda)
    assert "Q4_K, Q6_K kept in GGUF blocks" in line and "decode steps fused" in line and "one CUDA-graph replay" in line
    monkeypatch.setenv("LEANK_CUDA_FUSED", "0")
    monkeypatch.setenv("LEANK_CUDA_GRAPHS", "0")
    line = linear.weights_path({"Q4_K": 3, "F32": 5}, cuda)
    assert "op by op between the gemv kernels" in line and "CUDA graphs off (LEANK_CUDA_GRAPHS=0)" in line
    monkeypatch.delenv("LEANK_CUDA_FUSED")
    line = linear.weights_path({"Q4_K": 3, "Q5_0": 2}, cuda)  # a type left to the float path: not fused
    assert "Q5_0 dequantized" in line and "op by op" in line


@pytest.mark.parametrize("name", ["dense", "leank-kivi2", "leank-k4v2-rotated"])
def test_static_step_over_a_batch_of_sequences_at_their_own_lengths(make_tiny, name):
    """The server's batch (`BatchCache`: one cache per row) through the device-length step: rows with
    prompts of 5, 23 and 40 tokens (their blocks reach the middle region at different steps) each get the
    logits of their own sequence stepped alone."""
    from leank.runtime.server.slots import BatchCache

    path = make_tiny(arch="llama", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
    m = leank.load(path, device="cpu")
    policy = policy_for(name, m.args)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, m.args.vocab_size, (1, n), generator=gen) for n in (5, 23, 40)]
    ours, alone = [m.new_cache(policy=policy) for _ in prompts], [m.new_cache(policy=policy) for _ in prompts]
    for p, a, b in zip(prompts, ours, alone):
        decode.prefill(m.transformer, a, p)
        decode.prefill(m.transformer, b, p)
    batch = BatchCache(ours)
    worst, agree, n = 0.0, 0, 60
    for _ in range(n):
        tokens = torch.randint(0, m.args.vocab_size, (3,), generator=gen)
        got = graph.static_step(m.transformer, batch, tokens)
        for row, cache in enumerate(alone):
            want = decode.prefill(m.transformer, cache, tokens[row].view(1, 1))[0]
            worst = max(worst, ((got[row] - want).abs().max() / want.abs().max()).item())
            agree += int(got[row].argmax() == want.argmax())
    assert [c.seq_len for c in ours] == [c.seq_len for c in alone] == [5 + n, 23 + n, 40 + n]
    assert batch.positions == [5 + n, 23 + n, 40 + n]
    if policy is not None:  # the rows moved blocks into the middle region at their own steps
        assert len({c.layers[0].middle_len for c in ours}) > 1
        assert [c.layers[0].middle_len for c in ours] == [c.layers[0].middle_len for c in alone]
    assert worst <= (5e-3 if policy is not None and policy.rotate else 1e-4) and agree == 3 * n


def test_a_capacity_past_the_context_or_out_of_memory_is_one_clear_error(make_tiny, monkeypatch):
    from leank.errors import LeankError

    m = leank.load(make_tiny(arch="llama", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256), device="cpu")
    with pytest.raises(LeankError, match=rf"{m.args.context_length + 1} tokens exceed the model's context of"):
        m.new_cache(capacity=m.args.context_length + 1)

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    monkeypatch.setattr(DenseCache, "__init__", no_room)
    with pytest.raises(LeankError, match=r"a dense KV cache for 2 x 512 tokens does not fit in CPU memory "
                                         r"\(CUDA out of memory. Tried to allocate 96.00 GiB\)"):
        m.new_cache(batch=2, capacity=512)
