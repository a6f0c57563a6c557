"""The whole model on CUDA (float16) against the CPU float32 model, and decoding against teacher forcing."""
import pytest
import torch

import leank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

IDS = [(7 * i + 3) % 60 + 2 for i in range(48)]  # token ids straight in: no tokenizer on the GPU machine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cuda_float16_model_matches_cpu_float32(make_tiny, arch):
    path = make_tiny(arch=arch, n_layers=3, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, tensor_type="Q8_0")
    ref = leank.load(path, device="cpu", weights="float32").logits(IDS)
    gpu = leank.load(path, device="cuda").logits(IDS)
    assert gpu.shape == ref.shape and torch.isfinite(gpu).all()
    assert (gpu - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (gpu.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("kv", ["dense", "kivi"])
def test_cuda_decode_equals_teacher_forcing(make_tiny, kv):
    from leank.runtime.cache.policy import CachePolicy

    m = leank.load(make_tiny(arch="llama", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256), device="cuda")
    full = m.logits(IDS)
    # KIVI at 8 bits with a short window: the middle region is used and nearly lossless
    policy = None if kv == "dense" else CachePolicy(k_bits=8, v_bits=8, sink_tokens=4, recent_tokens=8,
                                                    block_tokens=8, group_size=8)
    cache = m.new_cache(policy=policy)
    with torch.inference_mode():
        m.transformer(torch.tensor([IDS[:12]], device="cuda"), cache)
        for i in range(12, len(IDS)):
            step = m.transformer(torch.tensor([[IDS[i]]], device="cuda"), cache)[0, -1].float().cpu()
            assert (step - full[i]).abs().max() <= 3e-2 * full[i].abs().max()
    if kv == "kivi":
        assert cache.nbytes().middle_k > 0
