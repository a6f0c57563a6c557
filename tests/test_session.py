"""Sessions on disk (issue 15): a saved cache restores bit-identical next-token logits; anything but a
session of this model under this policy is refused with one `LeankError` line (fuzzed like the loaders)."""
from __future__ import annotations

import json
import struct

import fuzzing as fz  # tests/fuzzing.py
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leank
from leank.errors import LeankError
from leank.masks.choose import build_policy
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.cache.session import load_session, save_session
from leank.runtime.chat import ChatSession
from leank.runtime.decode import prefill, step

CI = settings(derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROMPT = "The history of the lighthouse keepers of the northern coast is long. " * 40  # ~600 tokens


def small_policy(model, kv: str) -> CachePolicy:
    """`kv` with a short window, so that a few hundred tokens reach the middle region."""
    return build_policy(model, kv=kv, sink_tokens=32, recent_tokens=64)


def saved(model, policy, ids, path):
    """A cache of `policy` holding `ids` (one prefill), saved to `path`; the cache."""
    cache = model.new_cache(policy=policy)
    prefill(model.transformer, cache, torch.tensor([ids]))
    save_session(path, model, cache, ids)
    return cache


@pytest.mark.parametrize("kv", ["dense", "kivi", "leank+kivi", "leank"])
def test_restored_session_gives_bit_identical_logits(default_model, tmp_path, kv):
    m = default_model
    policy = small_policy(m, kv)
    ids = m.tokenize(PROMPT)
    cache = m.new_cache(policy=policy)
    prefill(m.transformer, cache, torch.tensor([ids]))
    for t in (11, 12, 13):  # some decode steps too: the full region is not only the prompt's
        step(m.transformer, cache, torch.tensor([t]))
    ids = ids + [11, 12, 13]
    path = tmp_path / "s.session"
    size = save_session(path, m, cache, ids)
    saved = load_session(path, m, policy)
    assert saved.tokens == ids and saved.cache.seq_len == len(ids)
    if not policy.is_dense:
        assert saved.cache.layers[-1].middle_len > 0
    # the file is the cache's bytes, the token ids and a small header
    assert size <= cache.nbytes().total + 8 * len(ids) + 64 * 1024
    for t in (42, 43, 44):
        a = step(m.transformer, cache, torch.tensor([t]))
        b = step(m.transformer, saved.cache, torch.tensor([t]))
        assert torch.equal(a, b)


def test_refuses_another_policy_and_another_model(default_model, tiny_llama, tmp_path):
    m = default_model
    policy = small_policy(m, "kivi")
    ids = m.tokenize("hello there")
    path = tmp_path / "s.session"
    saved(m, policy, ids, path)
    with pytest.raises(LeankError, match="another cache policy"):
        load_session(path, m, CachePolicy())
    with pytest.raises(LeankError, match="another cache policy"):
        load_session(path, m, policy.replace(k_bits=4))
    tiny = leank.load(tiny_llama, device="cpu")
    with pytest.raises(LeankError, match="another model"):
        load_session(path, tiny, policy)
    with pytest.raises(LeankError, match="no such session file"):
        load_session(tmp_path / "missing", m, policy)
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))  # atomic write: no temporary left


def test_damaged_and_truncated_files_are_refused(default_model, tmp_path):
    m = default_model
    ids = m.tokenize(PROMPT)[:300]
    policy = small_policy(m, "leank+kivi")
    path = tmp_path / "s.session"
    saved(m, policy, ids, path)
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(LeankError):
            load_session(path, m, policy)
    flipped = bytearray(data)
    flipped[-1000] ^= 0x10  # inside a tensor: only the digest can tell
    path.write_bytes(bytes(flipped))
    with pytest.raises(LeankError, match="damaged"):
        load_session(path, m, policy)


def _rewrite_header(data: bytes, change) -> bytes:
    """The same file with its JSON header changed by `change(dict)` (the tensors untouched)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    inner = json.loads(header["__metadata__"]["leank"])
    change(inner)
    header["__metadata__"]["leank"] = json.dumps(inner)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.mark.parametrize("change", [
    lambda h: h.update(tokens=10**9),
    lambda h: h.update(tokens=-1),
    lambda h: h.update(full=[1] * len(h["full"])),
    lambda h: h.update(middle="x"),
    lambda h: h.update(version=99),
    lambda h: h.update(extra=[1]),
    lambda h: h.update(sha256="sha256:00"),
    lambda h: h.update(full=[h["full"][0] - 32] * len(h["full"]), middle=[h["middle"][0] + 32] * len(h["full"])),
])
def test_hostile_headers_are_refused(default_model, tmp_path, change):
    m = default_model
    ids = m.tokenize(PROMPT)[:200]
    policy = small_policy(m, "kivi")
    path = tmp_path / "s.session"
    saved(m, policy, ids, path)
    path.write_bytes(_rewrite_header(path.read_bytes(), change))
    with pytest.raises(LeankError):
        load_session(path, m, policy)


def test_chat_session_saves_and_resumes(default_model, tmp_path):
    m = default_model
    policy = small_policy(m, "leank+kivi")
    greedy = dict(max_tokens=12, temperature=0)
    a = ChatSession(m, system="You are terse.", policy=policy)
    "".join(s.text for s in a.send("Name a colour.", **greedy))
    path = tmp_path / "chat.session"
    a.save(path)
    b = ChatSession(m, policy=policy)
    b.load(path)
    assert b.messages == a.messages and b.tokens == a.tokens and b.system == "You are terse."
    reply_a = "".join(s.text for s in a.send("And a fruit?", **greedy))
    reply_b = "".join(s.text for s in b.send("And a fruit?", **greedy))
    assert reply_a == reply_b and b.rebuilds == 0
    c = ChatSession(m, policy=CachePolicy())
    with pytest.raises(LeankError, match="another cache policy"):
        c.load(path)
    assert c.messages == [] and c.cache.seq_len == 0  # a refused file changes nothing


# --- fuzzing -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session(tiny_llama, tmp_path_factory):
    m = leank.load(tiny_llama, device="cpu")
    policy = CachePolicy(k_bits=2, v_bits=4, group_size=16, sink_tokens=16, recent_tokens=32, block_tokens=16)
    ids = list(range(5, 125))
    path = tmp_path_factory.mktemp("session") / "seed.session"
    saved(m, policy, ids, path)
    return m, policy, path.read_bytes()


class Draw:
    """tests/fuzzing.py's chooser interface, hypothesis making every choice."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def raw(self, n):
        return self.data.draw(st.binary(min_size=n, max_size=n))

    def coin(self, p=0.5):
        return self.data.draw(st.integers(0, 999)) < p * 1000


def mutate_session(data: bytes, c) -> bytes:
    """A tensor entry's dtype, shape or offsets, or a field of the leank header, rewritten."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    if c.coin(0.5):
        entry = header[c.choice(names)]
        entry[c.choice(["shape", "dtype", "data_offsets"])] = c.choice(
            [[1, 1, 2**40, 64], [0], [], "U8", "F16", "I64", "BOOL", [0, 10**12], [5, 3], [1, 2, 3, 4, 5]])
    else:
        inner = json.loads(header["__metadata__"]["leank"])
        key = c.choice(sorted(inner))
        inner[key] = c.choice([None, 0, -1, 2**63, "x", [], {}, [0] * 2, 1e999, [[[[]]]], inner.get("full")])
        header["__metadata__"]["leank"] = json.dumps(inner)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@settings(CI, max_examples=300)
@given(data=st.data())
def test_fuzzed_session_files_load_or_are_refused(tiny_session, tmp_path, data):
    m, policy, seed = tiny_session
    c = Draw(data)
    kind = c.integer(0, 2)
    if kind == 0:
        blob = fz.mutate_bytes(seed, c, hot_end=8 + struct.unpack("<Q", seed[:8])[0])
    elif kind == 1:
        blob = fz.mutate_bytes(seed, c)
    else:
        blob = mutate_session(seed, c)
    path = tmp_path / "input.session"
    path.write_bytes(blob)
    try:
        saved = load_session(path, m, policy)
    except LeankError as e:
        assert "\n" not in str(e)
        return
    # accepted: it must be a usable cache
    logits = step(m.transformer, saved.cache, torch.tensor([1]))
    assert logits.shape == (1, m.args.vocab_size)
