"""ggml programs (kernels/ggml_cpu.py `Program`, kernels/ggml_graph.c leank_ggml_prog_*): each node kind
against a float64 reference on random data into poisoned outputs, segments that feed later ones, the
refusals; and the CPU decode step built from them (runtime/model/transformer.py `CpuDecodeStep`) against
the per-product path and the float32 model."""
import pytest
import torch

from blocks import random_blocks  # tests/blocks.py
from leank.kernels import ggml_cpu
from test_ggml_cpu import activation_error_bound

needs_ggml = pytest.mark.skipif(not ggml_cpu.available(), reason=f"ggml unavailable: {ggml_cpu.unavailable_reason()}")


def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def silu64(g: torch.Tensor) -> torch.Tensor:
    return g * torch.sigmoid(g)


@needs_ggml
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_elementwise_nodes_equal_float64(rows, threads):
    """RMSNorm (times its weight), SwiGLU and adds (a bias broadcast over rows) to float32 rounding;
    outputs bound into columns of a wider poisoned tensor leave its other columns alone."""
    g = torch.Generator().manual_seed(rows)
    n = 320
    x, y = torch.randn(rows, n, generator=g) * 3, torch.randn(rows, n, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    P = ggml_cpu.Program(16, 1, slots=3)
    xi, yi = P.input(0, n, rows), P.input(1, n, rows)
    norm = P.rms_norm(xi, w, 1e-5)
    glu = P.swiglu(xi, yi)
    added = P.add(P.add(xi, yi), P.constant(b))
    width = 3 * n + 5
    for k, node in enumerate((norm, glu, added)):
        P.bind(node, 2, ld=width, col=k * n)
    assert P.end_segment() == 0
    P.finish()
    out = torch.full((rows, width), float("nan"))
    ptrs = P.pointers()
    ptrs[0], ptrs[1], ptrs[2] = x.data_ptr(), y.data_ptr(), out.data_ptr()
    P.run(0, ptrs, threads)
    assert out[:, 3 * n :].isnan().all()  # not written
    got = out[:, : 3 * n].double()
    ref = torch.cat([rms_norm64(x, w, 1e-5), silu64(x.double()) * y.double(), x.double() + y.double() + b.double()], 1)
    assert torch.allclose(got, ref, rtol=2e-6, atol=2e-6), (got - ref).abs().max()


def product_bound(w, x, type_name, x_err=None):
    """|ggml's W x - the exact W x| for an input known to within x_err of x: the activations' 8-bit
    rounding (test_ggml_cpu's bound) plus what the input's own error can move it."""
    bound = activation_error_bound(w, x.float(), type_name).double()
    if x_err is not None:
        bound = bound + x_err @ w.double().abs().T
    return bound


@needs_ggml
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_two_segment_block_is_bounded_by_the_8_bit_activation_error(rows, threads):
    """A transformer block as CpuDecodeStep builds it: segment 0 RMSNorm and q|k|v (three parts of
    different types, biases) bound side by side into one slot; segment 1 the attention output product,
    the residual add of segment 0's residual stream (carried in the program's memory), RMSNorm, gate and
    up, SwiGLU, down, the residual add. Each product within the 8-bit rounding of its activations,
    propagated through the chain to first order (x1.5)."""
    g = torch.Generator().manual_seed(10 + rows)
    dim, ffn, qs, kvs, eps = 256, 512, 256, 128, 1e-5
    wq_b, tq, wq = random_blocks("Q4_K", qs, dim, seed=1, signed=True)
    wk_b, tk, wk = random_blocks("Q6_K", kvs, dim, seed=2, signed=True)
    wv_b, tv, wv = random_blocks("Q8_0", kvs, dim, seed=3, signed=True)
    wo_b, to, wo = random_blocks("Q5_K", dim, qs, seed=4, signed=True)
    wg_b, tg, wg = random_blocks("Q4_K", ffn, dim, seed=5, signed=True)
    wu_b, tu, wu = random_blocks("Q4_K", ffn, dim, seed=6, signed=True)
    wd_b, td, wd = random_blocks("Q6_K", dim, ffn, seed=7, signed=True)
    mats = {k: ggml_cpu.matrix([(ggml_cpu.aligned(b), t) for b, t in parts], kk) for k, parts, kk in (
        ("qkv", [(wq_b, tq), (wk_b, tk), (wv_b, tv)], dim), ("o", [(wo_b, to)], qs),
        ("gu", [(wg_b, tg), (wu_b, tu)], dim), ("d", [(wd_b, td)], ffn))}
    n1, n2 = torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5
    bias = torch.randn(qs + 2 * kvs, generator=g)
    shift = torch.randn(dim, generator=g)
    x = torch.randn(rows, dim, generator=g) * 2
    attn = torch.randn(rows, qs, generator=g)

    P = ggml_cpu.Program(64, 2, slots=4)
    x0 = P.add(P.input(0, dim, rows), P.constant(shift))  # an op node: the residual stream segment 1 reads
    xn = P.rms_norm(x0, n1, eps)
    col = 0
    for node, n in zip(P.matmul(mats["qkv"], xn), (qs, kvs, kvs)):
        P.bind(P.add(node, P.constant(bias[col : col + n])), 1, ld=qs + 2 * kvs, col=col)
        col += n
    P.end_segment()
    (o,) = P.matmul(mats["o"], P.input(2, qs, rows))
    h = P.add(x0, o)
    gate, up = P.matmul(mats["gu"], P.rms_norm(h, n2, eps))
    (down,) = P.matmul(mats["d"], P.swiglu(gate, up))
    P.bind(P.add(h, down), 3, ld=dim)
    P.end_segment()
    P.finish()
    qkv = torch.full((rows, qs + 2 * kvs), float("nan"))
    out = torch.full((rows, dim), float("nan"))
    ptrs = P.pointers()
    ptrs[0], ptrs[1] = x.data_ptr(), qkv.data_ptr()
    P.run(0, ptrs, threads)
    ptrs[0], ptrs[1], ptrs[2], ptrs[3] = 0, 0, attn.data_ptr(), out.data_ptr()  # segment 1 reads only slots 2, 3
    P.run(1, ptrs, threads)

    xs = x.double() + shift.double()
    xn_ref = rms_norm64(xs, n1, eps)
    ref_qkv = torch.cat([xn_ref @ w.double().T for w in (wq, wk, wv)], 1) + bias.double()
    bound_qkv = torch.cat([product_bound(w, xn_ref, t) for w, t in ((wq, "Q4_K"), (wk, "Q6_K"), (wv, "Q8_0"))], 1)
    assert ((qkv.double() - ref_qkv).abs() <= bound_qkv + 1e-5).all()

    h_ref = xs + attn.double() @ wo.double().T
    e_h = product_bound(wo, attn.double(), "Q5_K")
    hn = rms_norm64(h_ref, n2, eps)
    rms = h_ref.pow(2).mean(-1, keepdim=True).sqrt()
    e_hn = 2 * e_h * n2.double().abs() / rms  # first order: the norm moves by at most ~2 |dh| / rms
    g_ref, u_ref = hn @ wg.double().T, hn @ wu.double().T
    e_g, e_u = product_bound(wg, hn, "Q4_K", e_hn), product_bound(wu, hn, "Q4_K", e_hn)
    a_ref = silu64(g_ref) * u_ref
    s = torch.sigmoid(g_ref)
    e_a = (s * (1 + g_ref * (1 - s))).abs() * e_g * u_ref.abs() + silu64(g_ref).abs() * e_u
    ref = h_ref + a_ref @ wd.double().T
    bound = 1.5 * (e_h + product_bound(wd, a_ref, "Q6_K", e_a)) + 1e-4
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all() and (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    assert err.max() > 0  # the activations really were quantized


@needs_ggml
def test_refusals_raise_instead_of_crashing():
    b, t, _ = random_blocks("Q8_0", 32, 64, seed=0)
    mat = ggml_cpu.matrix([(ggml_cpu.aligned(b), t)], 64)
    P = ggml_cpu.Program(16, 2, slots=2)
    x = P.input(0, 64, 1)
    with pytest.raises(ValueError):
        P.matmul(mat, P.input(0, 32, 1))  # a row length that is not the matrix's
    with pytest.raises(ValueError):
        P.add(x, P.constant(torch.ones(32)))  # not broadcastable
    with pytest.raises(ValueError):
        P.input(2, 64, 1)  # no such slot
    (y,) = P.matmul(mat, x)
    P.bind(y, 1, ld=32)
    with pytest.raises(ValueError):
        P.bind(y, 1, ld=16)  # bound twice, and a row stride shorter than the row
    P.end_segment()
    with pytest.raises(ValueError):
        P.swiglu(y, y)  # a bound node is not kept for a later segment
    z = P.rms_norm(x, torch.ones(64), 1e-5)
    P.bind(z, 1, ld=64)
    P.end_segment()
    with pytest.raises(ValueError):
        P.end_segment()  # no room for a third
    P.finish()
    ptrs = P.pointers()
    ptrs[0] = torch.zeros(1, 64).data_ptr()
    with pytest.raises(RuntimeError):
        P.run(0, ptrs, 1)  # slot 1 is NULL
    with pytest.raises(RuntimeError):
        P.run(2, ptrs, 1)  # no such segment


def decode_steps(m, ids, prompt, program: bool, cache=None, batch=1):
    """Teacher-forced decode logits (batch, len(ids) - prompt, vocab) with the program or without."""
    from leank.runtime.model.transformer import CpuDecodeStep

    tr = m.transformer
    tr._cpu_steps.clear()
    if not program:
        tr._cpu_steps[batch] = None
    cache = m.new_cache(batch=batch) if cache is None else cache
    rows = torch.tensor([ids] * batch)
    with torch.inference_mode():
        tr(rows[:, :prompt], cache)
        out = torch.cat([tr(rows[:, i : i + 1], cache) for i in range(prompt, len(ids))], 1)
    assert isinstance(tr._cpu_steps.get(batch), CpuDecodeStep) == program
    return out


@needs_ggml
@pytest.mark.parametrize("arch,tensor_type,overrides", [
    ("qwen2", "Q8_0", {}),                    # q|k|v biases
    ("llama", "Q4_K", {"ffn_down": "Q6_K"}),  # interleaved RoPE, K-quants as a Q4_K_M file
    ("qwen3", "Q4_0", {"attn_v": "Q8_0"}),    # q/k norms between the products and RoPE; q, k, v of two types
])
def test_decode_program_equals_the_per_product_path(make_tiny, arch, tensor_type, overrides):
    """The program's decode steps stay as close to the float32 model's logits as the per-product path
    (both multiply with 8-bit activations; the norms and SwiGLU are ggml's instead of leank's and torch's)."""
    import leank

    path = make_tiny(arch=arch, n_layers=3, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, tensor_type=tensor_type,
                     type_overrides=overrides)
    ids = list(range(3, 40))
    exact = leank.load(path, device="cpu", weights="float32").logits(ids)[20:]
    m = leank.load(path, device="cpu")
    per_product = decode_steps(m, ids, 20, program=False)[0]
    program = decode_steps(m, ids, 20, program=True)[0]
    scale = exact.abs().max()
    err_program, err_per_product = (program - exact).abs().max() / scale, (per_product - exact).abs().max() / scale
    assert err_program <= 1.5 * err_per_product + 2e-3, (err_program, err_per_product)
    assert (program - per_product).abs().max() <= 0.05 * scale


@needs_ggml
def test_a_batch_and_a_compressed_cache_through_the_program(make_tiny):
    """Three sequences a step (the server's batch) and a compressed cache whose middle fills during the
    decode (KIVI-2 past a short recent window): the same logits as the per-product path, within 8-bit
    activation noise, and every row of the batch the same as the others (same tokens)."""
    import leank
    from leank.masks.choose import build_policy

    path = make_tiny(arch="llama", n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, tensor_type="Q8_0")
    m = leank.load(path, device="cpu")
    ids = list(range(5, 85))
    a = decode_steps(m, ids, 8, program=False, batch=3)
    b = decode_steps(m, ids, 8, program=True, batch=3)
    assert torch.equal(b[0], b[1]) and torch.equal(b[0], b[2])
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    policy = build_policy(m, kv="kivi", k_bits=2, v_bits=2, sink_tokens=4, recent_tokens=16, block_tokens=16, group_size=16)
    c = decode_steps(m, ids, 8, program=False, cache=m.new_cache(policy=policy))
    cache = m.new_cache(policy=policy)
    d = decode_steps(m, ids, 8, program=True, cache=cache)
    assert cache.layers[0].middle_len > 0  # the middle really was attended
    assert (c - d).abs().max() <= 0.05 * c.abs().max()


@needs_ggml
def test_the_program_can_be_switched_off(make_tiny, monkeypatch):
    import leank
    from leank.runtime.model.transformer import CpuDecodeStep

    m = leank.load(make_tiny(arch="llama", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, tensor_type="Q8_0"),
                   device="cpu")
    assert CpuDecodeStep.eligible(m.transformer)
    monkeypatch.setenv("LEANK_GGML_PROGRAM", "0")
    assert not CpuDecodeStep.eligible(m.transformer)
    f32 = leank.load(make_tiny(arch="llama", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128), device="cpu")
    monkeypatch.delenv("LEANK_GGML_PROGRAM")
    assert not CpuDecodeStep.eligible(f32.transformer)  # float32 matrices: torch's path


@needs_ggml
@pytest.mark.parametrize("arch,spec", [
    ("llama", {}), ("qwen2", {}), ("llama", dict(rope_freqs=True)), ("llama", dict(rope_scaling=("linear", 4.0))),
    ("qwen2", dict(rope_scaling=("yarn", 4.0, 256))),
])
def test_the_programs_rope_equals_leanks(make_tiny, arch, spec):
    """RoPE in the program (ggml_rope_ext with `ggml_rope_args`) against `Rope`'s float64 tables, per-head
    RMSNorm before it (qwen3's q/k norms), rows at their own positions: within float32 angles' error."""
    import leank
    from leank.runtime.model.transformer import ggml_rope_args

    m = leank.load(make_tiny(arch=arch, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=128, **spec), device="cpu")
    a, rope = m.args, m.transformer.rope
    args = ggml_rope_args(a, rope)
    assert args is not None and (args["freq_factors"] is not None) == bool(spec.get("rope_freqs"))
    positions = [0, 7, 300, 2040]
    rows, heads, D = len(positions), a.n_heads, a.head_dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, heads * D, generator=g)
    w = torch.rand(D, generator=g) + 0.5
    P = ggml_cpu.Program(16, 1, slots=3)
    xi, pos = P.input(0, heads * D, rows), P.input_i32(1, rows)
    plain = P.rope(P.reshape(P.add(xi, P.constant(torch.zeros(heads * D))), rows, heads, D), pos, D, **args)
    normed = P.rope(P.rms_norm(P.reshape(P.add(xi, P.constant(torch.zeros(heads * D))), rows, heads, D), w, 1e-6),
                    pos, D, **args)
    width = 2 * heads * D + 3
    P.bind(plain, 2, ld=width)
    P.bind(normed, 2, ld=width, col=heads * D)
    P.end_segment()
    P.finish()
    out = torch.full((rows, width), float("nan"))
    ptrs = P.pointers()
    p32 = torch.tensor(positions, dtype=torch.int32)
    ptrs[0], ptrs[1], ptrs[2] = x.data_ptr(), p32.data_ptr(), out.data_ptr()
    P.run(0, ptrs, 2)
    tables = rope.tables_at(positions)
    xs = x.view(rows, 1, heads, D)
    ref_plain = tables.apply(xs).reshape(rows, -1)
    ref_normed = tables.apply((rms_norm64(xs, w, 1e-6)).float()).reshape(rows, -1)
    assert out[:, 2 * heads * D :].isnan().all()
    for got, ref in ((out[:, : heads * D], ref_plain), (out[:, heads * D : 2 * heads * D], ref_normed)):
        assert (got - ref).abs().max() <= 2e-4 * ref.abs().max(), (got - ref).abs().max()
