"""Matrices kept in GGUF blocks on CUDA (issue 14): the TileLang kernels of `leank.kernels.tl_gemv`
against gguf-py and the float64 product, on random blocks of every type, into poisoned outputs; the
`CudaQuantLinear` built from them; a quantized model on CUDA against the CPU."""
import pytest
import torch

import leank
from blocks import TYPE_NAMES, gemv_error_bound, quantized_activations, random_blocks  # tests/blocks.py
from leank.kernels import cpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DTYPES = [torch.bfloat16, torch.float16]


def ops():
    from leank.kernels import tilelang_ops

    return tilelang_ops


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Every kernel these tests use, compiled in parallel before the first test."""
    tl = ops()
    specs = [s for dt in DTYPES for s in tl.gemv_specs(TYPE_NAMES, dt)]
    specs += [("dequant", t, "float32") for t in TYPE_NAMES]
    assert not tl.precompile(specs)


def qk(type_name):
    from leank.kernels.gguf_cuda import TYPES

    return TYPES[type_name][0]


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_dequantize_equals_gguf_py_bit_for_bit(type_name):
    blocks, _, w = random_blocks(type_name, rows=41, k=3 * qk(type_name), seed=1, signed=True)
    dev = blocks.cuda()
    ids = torch.tensor([40, 0, 7, 7, 39], dtype=torch.int32, device="cuda")
    tl = ops()
    out = tl.dequantize(dev, type_name, ids, torch.float32).cpu()
    assert torch.equal(out.view(torch.int32), w[ids.long().cpu()].view(torch.int32))
    for dt in DTYPES:  # the compute dtypes: gguf-py's float32 rounded to nearest
        got = tl.dequantize(dev, type_name, ids, dt).cpu()
        assert torch.equal(got.view(torch.int16), w[ids.long().cpu()].to(dt).view(torch.int16))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the TileLang wrappers allocate starts as NaN, so an element a kernel skips shows."""
    tl = ops()
    real = tl._empty

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(tl, "_empty", poisoned)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_equals_the_product_and_writes_only_its_columns(type_name, m, dtype):
    n, k = 45, qk(type_name) * (4 if qk(type_name) == 256 else 40)
    blocks, _, w = random_blocks(type_name, rows=n, k=k, seed=m, signed=True)
    x = torch.randn(m, k).to(dtype)
    x[-1, 32:64] = 0  # a group of zeros: scale 0
    xq, xd = ops().quantize_x(x.cuda())
    ref_q, ref_d = quantized_activations(x)
    assert torch.equal(xq.cpu(), ref_q) and torch.equal(xd.cpu(), ref_d)
    y = torch.full((m, n + 10), float("nan"), dtype=dtype, device="cuda")
    ops().gemv(blocks.cuda(), type_name, xq, xd, y, 3)
    y = y.float().cpu()
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    tol = gemv_error_bound(x, w) * 1.001 + 2 * torch.finfo(dtype).eps * ref.abs() + 1e-5 * scale
    assert ((y[:, 3:3 + n].double() - ref).abs() <= tol).all()
    assert y[:, :3].isnan().all() and y[:, 3 + n:].isnan().all()


@pytest.mark.parametrize("rows", [1, 8, 9, 300])
def test_cuda_quant_linear_with_parts_of_two_types_and_a_bias(rows, monkeypatch):
    from leank.runtime.model.linear import CudaQuantLinear

    k = 512
    monkeypatch.setattr(CudaQuantLinear, "DECODE_CHUNK", 40 * k)  # several slices per part for many rows
    a, ta, wa = random_blocks("Q4_K", rows=64, k=k, seed=2)
    b, tb, wb = random_blocks("Q6_K", rows=32, k=k, seed=3)
    c, tc, wc = random_blocks("Q4_K", rows=32, k=k, seed=4)
    bias = torch.randn(128, dtype=torch.bfloat16, device="cuda")
    lin = CudaQuantLinear([(a, ta), (b, tb), (c, tc)], k, bias, torch.device("cuda"), torch.bfloat16)
    assert len(lin.groups) == 3 and lin.out_features == 128 and lin.nbytes == a.numel() + b.numel() + c.numel() + 256
    assert [len(c) for c in lin._chunks] == [2, 1, 1]
    x = torch.randn(1, rows, k).to(torch.bfloat16)  # 1 and 8 rows: the gemv kernel; 9 and 300: decoded slices
    y = lin(x.cuda()).float().cpu()
    w = torch.cat([wa, wb, wc])
    ref = x.double() @ w.double().T + bias.double().cpu()
    scale = x.double().abs() @ w.double().abs().T
    assert y.shape == (1, rows, 128)
    assert ((y.double() - ref).abs() <= 0.02 * scale + 0.02).all()
    assert torch.equal(lin.weight.cpu(), w.to(torch.bfloat16))


def test_embedding_rows_and_ids_out_of_range():
    from leank.runtime.model.linear import CudaQuantLinear

    blocks, t, w = random_blocks("Q4_K", rows=100, k=256, seed=9)
    emb = CudaQuantLinear([(blocks, t)], 256, None, torch.device("cuda"), torch.float16)
    ids = torch.tensor([[3, 99, 0], [3, 3, 50]], device="cuda")
    assert torch.equal(emb.rows(ids).cpu(), w[ids.cpu()].to(torch.float16))
    with pytest.raises(IndexError):
        emb.rows(torch.tensor([100], device="cuda"))


@pytest.mark.parametrize("tensor_type", ["Q4_K", "Q8_0", "Q5_0"])
def test_quantized_model_on_cuda_keeps_blocks_and_matches_cpu(make_tiny, tensor_type):
    from leank.runtime.memory import planned_weights, weights_nbytes
    from leank.runtime.model.linear import CudaQuantLinear

    ids = [1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12]
    path = make_tiny(arch="qwen2", n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, tensor_type=tensor_type)
    ref = leank.load(path, device="cpu", weights="float32").logits(ids)
    m = leank.load(path, device="cuda", dtype=torch.bfloat16)
    assert isinstance(m.transformer.layers[0].feed_forward.w_down, CudaQuantLinear)
    assert isinstance(m.transformer.tok_embeddings, CudaQuantLinear)
    plan = planned_weights(m.file, m.args, torch.device("cuda"), torch.bfloat16)
    assert plan.nbytes == weights_nbytes(m.transformer)
    gpu = m.logits(ids)  # a prompt: decoded slices and cuBLAS
    assert (gpu - ref).abs().max() <= 3e-2 * ref.abs().max()
    cache = m.new_cache()
    with torch.inference_mode():  # decode steps: the gemv kernel
        m.transformer(torch.tensor([ids[:6]], device="cuda"), cache)
        for i in range(6, len(ids)):  # 8-bit activations: a few per cent of the largest logit at most
            step = m.transformer(torch.tensor([[ids[i]]], device="cuda"), cache)[0, -1].float().cpu()
            assert (step - ref[i]).abs().max() <= 5e-2 * ref[i].abs().max()


def test_blocks_can_be_turned_off(make_tiny, monkeypatch):
    from leank.runtime.model.linear import CudaQuantLinear

    monkeypatch.setenv("LEANK_CUDA_BLOCKS", "0")
    m = leank.load(make_tiny(arch="llama", n_layers=1, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256,
                             tensor_type="Q8_0"), device="cuda")
    assert not isinstance(m.transformer.layers[0].attention.wqkv, CudaQuantLinear)
    assert cpu.switched_off("LEANK_CUDA_BLOCKS")
