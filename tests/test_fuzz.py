"""CI-sized fuzzing (issue 7): tests/fuzzing.py's mutators and targets under hypothesis.

Seeds are valid tiny files; hypothesis drives the byte- and structure-level mutations. The only
acceptable outcomes are success and one `LeankError` line (and, for convert, nothing left behind but a
complete output). Derandomized, so CI sees the same inputs every run; `bench/fuzz.py` is the long run.
"""
from __future__ import annotations

from collections import Counter

import fuzzing as fz  # tests/fuzzing.py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OUTCOMES: Counter = Counter()  # (target, "ok" | "refused") over this session's inputs
CI = settings(derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


class DrawChooser:
    """tests/fuzzing.py's chooser interface, with hypothesis making every choice (so it can shrink them)."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def raw(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))

    def coin(self, p: float = 0.5) -> bool:
        return self.data.draw(st.integers(0, 999)) < p * 1000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seeds (bytes), their GGUF parts and header ends, and a work directory."""
    root = tmp_path_factory.mktemp("fuzz")
    seeds = fz.make_seeds(root / "seeds")
    data = {kind: [p.read_bytes() for p in paths] for kind, paths in seeds.items()}
    work = root / "work"
    work.mkdir()
    return {"data": data, "parts": [fz.split_gguf(b) for b in data["gguf"]],
            "hot": [fz.header_end(b) for b in data["gguf"]], "work": work}


def run(corpus, target: str, data) -> None:
    kind, fn = fz.TARGETS[target]
    c = DrawChooser(data)
    k = c.integer(0, len(corpus["data"][kind]) - 1)
    seed = corpus["data"][kind][k]
    if kind == "gguf":
        blob = fz.make_input(kind, seed, c, corpus["parts"][k], corpus["hot"][k])
    elif kind == "safetensors":
        blob = fz.mutate_safetensors(seed, c)
    else:
        blob = fz.make_input(kind, seed, c)
    path = corpus["work"] / f"input{fz.SUFFIX[kind]}"
    path.write_bytes(blob)
    out = fz.run_target(fn, path, corpus["work"], timeout=30)
    assert out.kind != "finding", out.detail
    OUTCOMES[target, out.kind] += 1


@settings(CI, max_examples=500)
@given(data=st.data())
def test_loader_header_and_policy(corpus, data):
    run(corpus, "header", data)


@settings(CI, max_examples=150)
@given(data=st.data())
def test_loader_with_weights(corpus, data):
    run(corpus, "load", data)


@settings(CI, max_examples=200)
@given(data=st.data())
def test_inspect(corpus, data):
    run(corpus, "inspect", data)


@settings(CI, max_examples=150)
@given(data=st.data())
def test_convert_succeeds_or_leaves_nothing(corpus, data):
    run(corpus, "convert", data)


@settings(CI, max_examples=60)
@given(data=st.data())
def test_llama_cpp_never_sees_a_file_it_crashes_on(corpus, data):
    """The file goes to llama.cpp (in a forked child) only if leank accepts it; no signal may end the child."""
    run(corpus, "tokenizer", data)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@settings(CI, max_examples=150)
@given(data=st.data())
def test_leank_pth_importer(corpus, data):
    run(corpus, "pth", data)


@settings(CI, max_examples=150)
@given(data=st.data())
def test_stage1_tsv_importer(corpus, data):
    run(corpus, "tsv", data)


@settings(CI, max_examples=150)
@given(data=st.data())
def test_native_mask_file(corpus, data):
    run(corpus, "safetensors", data)


def test_the_fuzzer_gets_past_the_checks():
    """Mutated inputs that all fail at the magic number would prove nothing: enough must be accepted."""
    print("fuzz outcomes:", dict(sorted(OUTCOMES.items())))  # shown with -s
    for target in ("header", "load", "convert", "tokenizer"):
        ok, refused = OUTCOMES[target, "ok"], OUTCOMES[target, "refused"]
        if ok + refused == 0:
            pytest.skip("run with the fuzz tests above")
        assert ok >= 0.03 * (ok + refused), f"{target}: {ok} accepted of {ok + refused}"
