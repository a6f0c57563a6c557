"""The runtime on tiny random GGUF models, checked against llama.cpp (llama-cpp-python) itself."""
import numpy as np
import pytest
import torch

import leank
from leank.convert.writer import write_float32_copy
from leank.errors import LeankError

TEXT = "the quick brown fox jumps over the lazy dog, then the dog sleeps in the sun. " * 5


def llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 K/V in llama.cpp so that both sides compute in float32 throughout
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0,
                          flash_attn=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


SPECS = {
    "llama-gqa": dict(arch="llama"),
    "llama-mqa-untied": dict(arch="llama", n_heads=8, n_kv_heads=1, dim=128, tied=False),
    "llama-rope-freqs": dict(arch="llama", rope_freqs=True),
    "llama-linear-scaling": dict(arch="llama", rope_scaling=("linear", 4.0)),
    "qwen2": dict(arch="qwen2"),
    "qwen2-yarn": dict(arch="qwen2", rope_scaling=("yarn", 4.0, 512), n_heads=2, n_kv_heads=1, head_dim=32),
    "qwen3": dict(arch="qwen3", head_dim=32),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_float32_logits_match_llama_cpp(make_tiny, name):
    path = make_tiny(**SPECS[name])
    m = leank.load(path, device="cpu")
    ids = m.tokenize(TEXT)
    assert len(ids) > 100
    ours = m.logits(ids).numpy()
    ref = llama_cpp_logits(path, ids)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("tensor_type,extra", [
    ("F16", {}), ("BF16", {}), ("Q8_0", {}), ("Q4_0", {}), ("Q4_1", {}), ("Q5_0", {}), ("Q5_1", {}),
    ("Q4_K", dict(dim=256, ffn_dim=256)), ("Q5_K", dict(dim=256, ffn_dim=256)), ("Q6_K", dict(dim=256, ffn_dim=256)),
])
def test_every_tensor_type_loads_as_its_dequantized_values(make_tiny, tmp_path, tensor_type, extra, monkeypatch):
    """A model stored as `tensor_type` computes exactly what its float32 re-export computes."""
    path = make_tiny(arch="qwen2", tensor_type=tensor_type, **extra)
    f32 = write_float32_copy(path, tmp_path / "f32.gguf")
    ids = leank.load(f32, device="cpu").tokenize(TEXT)[:64]
    exact = leank.load(path, device="cpu", weights="float32").logits(ids)
    assert torch.equal(exact, leank.load(f32, device="cpu").logits(ids))
    # the default CPU storage: quantized blocks multiplied in C where the kernels know the type, float16
    # copies otherwise (close, not identical). leank's own kernels use the same weights, float32 sums
    # in another order. ggml's (the default where installed) quantize activations to 8 bits: about 1 %
    # per product (tests/test_ggml_cpu.py bounds it), which these random models, with activations in
    # the tens of thousands, amplify from layer to layer (the Q6_K one ends 60 % off in its largest
    # logit); their fidelity is checked against llama.cpp on real models (tests/test_fidelity.py)
    from leank.kernels import ggml_cpu
    from leank.runtime.model.linear import quantized_kernels_for

    with monkeypatch.context() as mp:
        mp.setattr(ggml_cpu, "_state", {"loaded": None, "why": "turned off by the test"})
        own = leank.load(path, device="cpu").logits(ids)
    tol = 1e-4 if quantized_kernels_for(tensor_type) else 2e-2
    assert (own - exact).abs().max() < tol * exact.abs().max()
    assert torch.isfinite(leank.load(path, device="cpu").logits(ids)).all()
    # forced to float16, every type still loads and stays close
    half = leank.load(path, device="cpu", weights="float16").logits(ids)
    assert (half - exact).abs().max() < 2e-2 * exact.abs().max()


def test_decode_equals_teacher_forcing(make_tiny):
    m = leank.load(make_tiny(arch="llama"), device="cpu")
    ids = m.tokenize(TEXT)[:40]
    full = m.logits(ids)
    cache = m.new_cache()
    with torch.inference_mode():
        m.transformer(torch.tensor([ids[:10]]), cache)
        for i in range(10, len(ids)):
            step = m.transformer(torch.tensor([[ids[i]]]), cache)[0, -1]
            assert torch.allclose(step, full[i], atol=1e-4)
        more = m.transformer(torch.tensor([[ids[0], ids[1]]]), cache, logits_for="all")  # a chunk after decoding
    assert cache.seq_len == len(ids) + 2
    assert more.shape[1] == 2


def test_generation_is_greedy_and_reproducible(make_tiny):
    m = leank.load(make_tiny(arch="qwen2"), device="cpu")
    a = "".join(m.generate("hello there", max_tokens=12, temperature=0))
    b = "".join(m.generate("hello there", max_tokens=12, temperature=0))
    assert a == b and len(a) > 0
    s1 = "".join(m.generate("hello there", max_tokens=12, temperature=1.0, seed=7))
    s2 = "".join(m.generate("hello there", max_tokens=12, temperature=1.0, seed=7))
    assert s1 == s2
    # the greedy continuation is the argmax of teacher-forced logits, token by token
    steps = [s for s in m.stream("hello there", max_tokens=6, temperature=0) if s.token is not None]
    ids = m.tokenize("hello there") + [s.token for s in steps]
    logits = m.logits(ids)
    n = len(ids) - len(steps)
    assert [int(logits[n - 1 + i].argmax()) for i in range(len(steps))] == [s.token for s in steps]


def test_stop_strings_and_max_tokens(make_tiny):
    m = leank.load(make_tiny(arch="llama"), device="cpu")
    text = "".join(m.generate("abc", max_tokens=30, temperature=0))
    assert text, "the tiny model must produce something"
    stop = text[3:5]
    cut = "".join(m.generate("abc", max_tokens=30, temperature=0, stop=[stop]))
    assert cut == text[: text.find(stop)]
    final = list(m.stream("abc", max_tokens=3, temperature=0))[-1]
    assert final.finish_reason in ("length", "stop")
    assert final.stats.generated_tokens <= 3


def test_chat_template_renders_and_is_sandboxed(make_tiny, tmp_path):
    from leank.convert.synthetic import TinySpec, write_tiny_model

    m = leank.load(make_tiny(arch="llama"), device="cpu")
    text = m.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = m.chat_tokens([{"role": "user", "content": "hi"}])
    assert ids[0] == m.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                 "{{ messages.__class__.__init__.__globals__ }}",
                 "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
                 "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
                 "{{ 'x' * 100000000 }}"):
        path = write_tiny_model(tmp_path / "evil.gguf", TinySpec(chat_template=evil))
        bad = leank.load(path, device="cpu")
        with pytest.raises(LeankError):
            bad.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_session_reuses_the_cache(make_tiny):
    from leank.runtime.chat import ChatSession

    m = leank.load(make_tiny(arch="llama"), device="cpu")
    chat = ChatSession(m)
    first = "".join(s.text for s in chat.send("hello", max_tokens=8, temperature=0))
    held = chat.cache.seq_len
    second = "".join(s.text for s in chat.send("and again", max_tokens=8, temperature=0))
    assert chat.cache.seq_len > held
    assert chat.rebuilds == 0
    assert [x["role"] for x in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first and chat.messages[3]["content"] == second
    # the same conversation replayed from scratch gives the same second reply
    fresh = ChatSession(m)
    list(fresh.send("hello", max_tokens=8, temperature=0))
    assert "".join(s.text for s in fresh.send("and again", max_tokens=8, temperature=0)) == second


def test_prompt_longer_than_context_is_a_clear_error(make_tiny):
    m = leank.load(make_tiny(arch="llama", context_length=64), device="cpu")
    with pytest.raises(LeankError, match="context"):
        list(m.generate("word " * 200, max_tokens=4))
    with pytest.raises(LeankError, match="context"):
        m.logits(m.tokenize("word " * 200))
