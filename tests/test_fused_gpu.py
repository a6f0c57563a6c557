"""The fused CUDA decode step (issue 14): `tilelang_ops.rmsnorm_qx`, `silu_mul_qx`, `rope_qk` and the gemv's
residual/bias epilogue against torch's unfused ops on random data into poisoned outputs, and a quantized
model's decode steps fused (`Block.fused_forward`) against the same steps unfused (LEANK_CUDA_FUSED=0)."""
import pytest
import torch

import leank
from blocks import (assert_same_quantized, gemv_error_bound, random_blocks, rmsnorm_reference, rope_reference,
                    silu_mul_reference)  # tests/blocks.py
from test_compressed_cache import random_mask  # tests/
from leank.runtime import decode, graph
from leank.runtime.cache.policy import CachePolicy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DTYPES = [torch.bfloat16, torch.float16]
MODELS = {  # head_dim 64 (llama, tied output) and 128 (qwen2: q|k|v biases, an untied Q6_K output)
    "llama-hd64": dict(arch="llama", n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, tensor_type="Q4_K"),
    "qwen2-hd128": dict(arch="qwen2", n_layers=2, dim=512, n_heads=4, n_kv_heads=2, ffn_dim=768, tensor_type="Q8_0",
                        tied=False, type_overrides={"output": "Q6_K", "ffn_down": "Q6_K"}),
}


def tlo():
    from leank.kernels import tilelang_ops

    return tilelang_ops


@pytest.fixture(scope="module", autouse=True)
def compiled():
    specs = [s for dt in DTYPES for neox in (True, False) for s in tlo().step_specs(dt, neox)]
    specs += [s for dt in DTYPES for s in tlo().gemv_specs(["Q4_K", "Q8_0", "Q6_K"], dt)]
    assert not tlo().precompile(specs)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the TileLang wrappers allocate starts as NaN (floats) or -1 (integers)."""
    real = tlo()._empty

    def empty(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(tlo(), "_empty", empty)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 4096), (3, 576), (8, 1536)])
def test_rmsnorm_into_8_bits_matches_the_unfused_ops(poisoned, dtype, M, K):
    gen = torch.Generator().manual_seed(K + M)
    x = (torch.randn(M, K, generator=gen) * torch.linspace(0.05, 6, K)).to(dtype)
    w = torch.rand(K, generator=gen) * 2 - 0.5
    xq, xd = tlo().rmsnorm_qx(x.cuda(), w.cuda(), 1e-6)
    assert_same_quantized(xq.cpu(), xd.cpu(), rmsnorm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,F", [(1, 14336), (5, 8960)])
def test_silu_times_up_into_8_bits_matches_the_unfused_ops(poisoned, dtype, M, F):
    gu = (torch.randn(M, 2 * F, generator=torch.Generator().manual_seed(F)) * 3).to(dtype)
    xq, xd = tlo().silu_mul_qx(gu.cuda())
    assert_same_quantized(xq.cpu(), xd.cpu(), silu_mul_reference(gu))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("M,Hq,Hkv,D", [(1, 32, 8, 128), (4, 9, 3, 64)])
def test_rope_equals_the_unfused_rotation(poisoned, dtype, neox, M, Hq, Hkv, D):
    gen = torch.Generator().manual_seed(M * D)
    P = 40000
    qkv = torch.randn(M, (Hq + 2 * Hkv) * D, generator=gen).to(dtype)
    theta = torch.arange(P, dtype=torch.float64)[:, None] * 500000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = torch.cos(theta).float(), torch.sin(theta).float()
    pos = torch.randint(0, P, (M,), generator=gen)
    q, k = tlo().rope_qk(qkv.cuda(), pos.cuda(), cos.cuda(), sin.cuda(), Hq, Hkv, D, neox)
    rq, rk = rope_reference(qkv, pos, cos, sin, Hq, Hkv, D, neox)
    # the same float32 operations in the same order, each rounded: the same bits
    assert torch.equal(q.cpu().view(torch.int16), rq.view(torch.int16))
    assert torch.equal(k.cpu().view(torch.int16), rk.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_adds_a_residual_or_a_bias(poisoned, dtype, m):
    n, k = 70, 512
    blocks, _, w = random_blocks("Q4_K", rows=n, k=k, seed=m, signed=True)
    x = torch.randn(m, k).to(dtype)
    xq, xd = tlo().quantize_x(x.cuda())
    dev = blocks.cuda()
    plain = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    tlo().gemv(dev, "Q4_K", xq, xd, plain, 0)
    res = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(dtype)
    ref = x.double() @ w.double().T
    tol = gemv_error_bound(x, w) * 1.001 + 4 * torch.finfo(dtype).eps * (ref.abs() + 8) + 1e-3
    for add in (res, bias):
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        tlo().gemv(dev, "Q4_K", xq, xd, y, 0, add.cuda())
        want = ref + add.double()
        assert ((y.cpu().double() - want).abs() <= tol).all()
        # the sum rounded once: within half an ulp of the rounded product plus the addend
        assert ((y.cpu().double() - (plain.cpu().double() + add.double())).abs()
                <= 2 * torch.finfo(dtype).eps * (want.abs() + plain.cpu().double().abs()) + 1e-6).all()
    inplace = res.clone().cuda()  # the residual stream updated in place: add is y itself
    tlo().gemv(dev, "Q4_K", xq, xd, inplace, 0, inplace)
    assert ((inplace.cpu().double() - (ref + res.double())).abs() <= tol).all()


def policy(name, args):
    if name == "dense":
        return CachePolicy()
    mask = random_mask(args.n_layers, args.n_kv_heads, args.head_dim, align=16, generator=torch.Generator().manual_seed(5))
    return CachePolicy(sink_tokens=16, recent_tokens=64, block_tokens=64, mask=mask, k_bits=4, v_bits=2,
                       group_size=64, rotate=True)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("cache_kind", ["dense", "leank-k4v2-rotated"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_steps_follow_the_unfused_ones(make_tiny, monkeypatch, model, cache_kind, rows):
    """The same prompt and tokens through two caches, one step fused and one unfused (op by op, no graphs);
    the caches each keep their own K/V, so a last-bit difference can move a stored code: the logits stay
    close and the argmax agrees on nearly every step."""
    monkeypatch.setenv("LEANK_CUDA_GRAPHS", "0")
    m = leank.load(make_tiny(**MODELS[model]), device="cuda", dtype=torch.bfloat16)
    assert m.transformer.fusable(rows) and not m.transformer.fusable(9)
    p = policy(cache_kind, m.args)
    fused, plain = m.new_cache(policy=p, batch=rows), m.new_cache(policy=p, batch=rows)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, m.args.vocab_size, (rows, 41), generator=gen)
    for c in (fused, plain):
        decode.prefill(m.transformer, c, prompt)
    agree, n, worst = 0, 160, 0.0
    for _ in range(n):  # 41 + 160 tokens: blocks move into the middle region
        token = torch.randint(0, m.args.vocab_size, (rows, 1), generator=gen).cuda()
        monkeypatch.setenv("LEANK_CUDA_FUSED", "1")
        a = m.transformer(token, fused)[:, -1].float().cpu()
        monkeypatch.setenv("LEANK_CUDA_FUSED", "0")
        b = m.transformer(token, plain)[:, -1].float().cpu()
        assert torch.isfinite(a).all()
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        agree += int((a.argmax(-1) == b.argmax(-1)).all())
    assert fused.seq_len == plain.seq_len == 41 + n
    assert worst <= 0.1 and agree >= 0.9 * n, (worst, agree)


def test_fused_graph_replay_equals_the_fused_step_op_by_op(make_tiny):
    m = leank.load(make_tiny(**MODELS["qwen2-hd128"]), device="cuda", dtype=torch.bfloat16)
    p = policy("leank-k4v2-rotated", m.args)
    ours, twin = m.new_cache(policy=p, capacity=512), m.new_cache(policy=p, capacity=512)
    prompt = torch.randint(0, m.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    for c in (ours, twin):
        decode.prefill(m.transformer, c, prompt)
    step = graph.graph_step(m.transformer, ours)
    for i in range(200):  # 30 + 200 tokens: past sink + recent + a block, the middle region fills
        token = torch.tensor([i + 5])
        a, b = step(token).cpu(), graph.static_step(m.transformer, twin, token).cpu()
        assert torch.isfinite(a).all() and ((a - b).abs().max() <= 1e-3 * b.abs().max()).item(), i
    assert step.captures == 2  # the first step, and the middle region's first tokens
