"""KIVI quantization reference: packing round trips and error bounds."""
import pytest
import torch

from leank.kernels.quant import (PACKABLE_BITS, dequantize_k, dequantize_v, pack, packed_width, quant_params,
                                 quantize_k, quantize_v, unpack)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("n", [1, 3, 8, 16, 33, 64])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (5, 7, n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 7, packed_width(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_is_little_endian_within_a_byte():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).tolist() == [[0x5A]]


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_k_quantization_error_within_half_a_step(bits):
    k = torch.randn(2, 3, 64, 24) * 3 + torch.randn(1, 1, 1, 24) * 5  # per-channel offsets, like real keys
    packed, scale, mn = quantize_k(k, bits, 32)
    assert scale.dtype == mn.dtype == torch.float16
    assert scale.shape == mn.shape == (2, 3, 2, 24)
    deq = dequantize_k(packed, scale, mn, bits, 32, 24)
    step = scale.float().repeat_interleave(32, dim=-2)
    assert ((deq - k).abs() <= step / 2 + 1e-6 * k.abs() + 1e-7).all()


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_v_quantization_error_within_half_a_step(bits):
    v = torch.randn(2, 3, 40, 64) * 2
    packed, scale, mn = quantize_v(v, bits, 32)
    assert scale.shape == mn.shape == (2, 3, 40, 2)
    deq = dequantize_v(packed, scale, mn, bits, 32, 64)
    step = scale.float().repeat_interleave(32, dim=-1)
    assert ((deq - v).abs() <= step / 2 + 1e-6 * v.abs() + 1e-7).all()


def test_constant_group_is_exact():
    v = torch.full((1, 1, 4, 32), 1.25)
    packed, scale, mn = quantize_v(v, 2, 32)
    assert torch.equal(dequantize_v(packed, scale, mn, 2, 32, 32), v)


def test_params_cover_the_range_after_float16_rounding():
    lo = torch.tensor([0.1234567, -1000.123, 3.0001, -0.0])
    hi = torch.tensor([0.5, 2000.77, 3.0001, 1e-8])
    for bits in PACKABLE_BITS:
        scale, mn = quant_params(lo, hi, bits)
        assert (mn.float() <= lo).all()
        assert (mn.float() + scale.float() * ((1 << bits) - 1) >= hi).all()


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("n", [64, 48, 16, 6])
def test_unpack_to_float_equals_the_codes(bits, n):
    """The CPU fast path (codes straight into a float tensor) for whole buffers, token slices and strided views."""
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, 40, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    for p in [packed, packed[:, :, 7:29], packed[:, 1:, ::2], packed.view(-1)[1:1 + 6 * packed.shape[-1]].view(6, -1)]:
        got = unpack(p, bits, n, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, unpack(p, bits, n).float())
    assert torch.equal(unpack(packed, bits, n, torch.float32), codes.float())
