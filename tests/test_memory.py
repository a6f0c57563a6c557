"""The memory planner (issue 15, item 4): `leank info --memory` adds up weights, KV cache and working set
for each candidate policy; `leank chat --memory` and `leank serve --memory` use the least compressed one
that fits. The table's bytes are held to a real loaded model and to real caches filled with N tokens."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leank.cli.options import parse_size
from leank.errors import LeankError
from leank.masks.choose import build_policy, planner_policies
from leank.runtime.decode import prefill
from leank.runtime.engine import open_header
from leank.runtime.memory import loaded_weights, plan_memory, planned_weights, weights_nbytes, working_set_nbytes
from leank.runtime.server.slots import PREFILL_CHUNK
from test_cli import assert_one_line_error

# `leank info` plans for the device `auto` picks; the fixtures' real model is on the CPU
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="leank info plans for the GPU on this machine")


def info_plan(leank_cli, *args) -> dict:
    r = leank_cli("info", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["memory"]


def fill(model, policy, n: int):
    """A cache of `model` under `policy` holding `n` tokens of random K and V, compacted as a prompt leaves it."""
    a = model.args
    cache = model.new_cache(policy=policy)
    gen = torch.Generator().manual_seed(0)
    for layer in range(a.n_layers):
        kv = torch.randn(1, a.n_kv_heads, n, a.head_dim, generator=gen)
        cache.append(layer, kv, kv)
        cache.attend(layer, torch.randn(1, a.n_heads, n, a.head_dim, generator=gen))
    return cache


# --- the table's numbers are the real ones ----------------------------------------------------------------
def test_planned_weights_are_the_loaded_models_bytes(default_model, default_model_path):
    h = open_header(default_model_path)
    plan = planned_weights(h.file, h.args, torch.device("cpu"), torch.float32)
    assert plan == loaded_weights(default_model.transformer)
    assert plan.nbytes == weights_nbytes(default_model.transformer) and plan.decoded_matrix > 0


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_planned_weights_follow_every_storage_choice(make_tiny, tensor_type, tied):
    import leank

    path = make_tiny(tensor_type=tensor_type, tied=tied)
    h = open_header(path)
    for dtype, weights in ((torch.float32, "auto"), (torch.float32, "float16"), (torch.float32, "float32"),
                           (torch.bfloat16, "auto")):
        m = leank.load(path, device="cpu", dtype=dtype, weights=weights)
        assert planned_weights(h.file, h.args, torch.device("cpu"), dtype, weights) == loaded_weights(m.transformer), \
            (dtype, weights)


def test_tied_float32_embeddings_are_counted_once(make_tiny):
    import leank

    t = leank.load(make_tiny(tensor_type="F32", tied=True), device="cpu").transformer
    assert t.output.weight.data_ptr() == t.tok_embeddings.data_ptr()  # one matrix: the table and the output
    total = weights_nbytes(t)
    t.output = None
    assert weights_nbytes(t) == total


@cpu_only
def test_info_table_holds_the_real_weights_and_caches_at_n(leank_cli, default_model):
    n = 1000  # past sink 128 + recent 512: the compressed caches have a middle region
    plan = info_plan(leank_cli, "--ctx", n, "--memory", "8GiB")
    assert (plan["context"], plan["budget_bytes"], plan["device"]) == (n, 8 << 30, "cpu")
    policies = planner_policies(default_model)
    assert [r["name"] for r in plan["rows"]] == [name for name, _ in policies] == ["dense", "kivi4", "leank+kivi"]
    weights = weights_nbytes(default_model.transformer)
    for row, (name, policy) in zip(plan["rows"], policies):
        cache = fill(default_model, policy, n)
        assert row["weights_bytes"] == weights
        assert row["kv_cache_bytes"] == cache.nbytes().total, name
        assert row["total_bytes"] == weights + row["kv_cache_bytes"] + row["working_set_bytes"]
        assert row["fits"] and row["margin_bytes"] == (8 << 30) - row["total_bytes"]
    caches = [r["kv_cache_bytes"] for r in plan["rows"]]
    assert caches == sorted(caches, reverse=True)  # least compressed first
    assert plan["chosen"] == "dense"


def test_info_text_table_and_model_context(leank_cli):
    r = leank_cli("info", "--memory", "8GiB")
    assert r.returncode == 0, r.stderr
    assert "Memory plan for 8.00 GiB at 8192 tokens" in r.stdout
    for column in ("policy", "weights", "KV cache", "working set", "total", "fits"):
        assert column in r.stdout
    assert "chat/serve --memory would use: dense" in r.stdout
    r = leank_cli("info", "--ctx", "32768", "--memory", "100MiB")
    assert "no, " in r.stdout and "over" in r.stdout and "nothing fits" in r.stdout
    assert "the model's context is 8192 tokens" in r.stdout
    assert "Memory plan" not in leank_cli("info", "--ctx", "512").stdout  # without --memory: as before


def test_a_policy_given_to_info_gets_its_own_row(leank_cli):
    plan = info_plan(leank_cli, "--memory", "8GiB", "--kv", "kivi", "--k-bits", "8", "--v-bits", "8")
    assert [r["name"] for r in plan["rows"]] == ["dense", "kivi4", "leank+kivi", "--kv kivi"]
    assert plan["given"] == plan["chosen"] == "--kv kivi"
    plan = info_plan(leank_cli, "--memory", "8GiB", "--kv", "dense")  # one of the candidates: listed once
    assert [r["name"] for r in plan["rows"]] == ["dense", "kivi4", "leank+kivi"] and plan["chosen"] == "dense"


# --- the working set --------------------------------------------------------------------------------------
class PeakTensors(TorchDispatchMode):
    """The most bytes of tensors alive at once while it is active (each storage counted once)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.sizes:
                    self.sizes[ptr] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr)
        return out


@pytest.mark.parametrize("kind", ["dense", "leank+kivi"])
@pytest.mark.parametrize("context, rows", [(2048, 2048), (2048, 512)])
@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_the_working_set_covers_what_a_prefill_holds(make_tiny, kind, context, rows, tensor_type):
    import leank

    m = leank.load(make_tiny(tensor_type=tensor_type, context_length=context, dim=128, ffn_dim=256), device="cpu")
    policy = build_policy(m, kv=kind, **({} if kind == "dense" else dict(sink_tokens=32, recent_tokens=64)))
    ids = torch.randint(0, m.args.vocab_size, (1, context))
    cache = m.new_cache(policy=policy)
    if rows < context:  # a chunk after a (compressed) past, as the server feeds a long prompt
        prefill(m.transformer, cache, ids[:, : context - rows])
    before = cache.nbytes()
    with PeakTensors() as peak:
        prefill(m.transformer, cache, ids[:, context - rows:])
    after = cache.nbytes()
    grown = max(0, (after.allocated or after.total) - (before.allocated or before.total))
    estimate = working_set_nbytes(m.args, context, rows=rows, policy=policy,
                                  decoded_matrix=loaded_weights(m.transformer).decoded_matrix)
    assert peak.peak - grown <= estimate


# --- chat and serve choose --------------------------------------------------------------------------------
def between(totals: list[int]) -> list[tuple[int, set[int]]]:
    """Budgets between consecutive distinct totals, each with the indices of the totals at or below it."""
    steps = sorted(set(totals))
    return [((a + b) // 2, {i for i, t in enumerate(totals) if t <= a}) for a, b in zip(steps, steps[1:])]


def chosen_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith("memory: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@cpu_only
def test_chat_picks_the_least_compressed_that_fits(leank_cli):
    ctx = 8192
    plan = info_plan(leank_cli, "--ctx", ctx, "--memory", "8GiB")
    totals = [r["total_bytes"] for r in plan["rows"]]
    budgets = between(totals) + [(max(totals) + 1, set(range(len(totals))))]
    assert budgets and any(len(fit) < len(totals) for _, fit in budgets)
    for budget, fit in budgets:
        marked = info_plan(leank_cli, "--ctx", ctx, "--memory", budget)["rows"]
        assert {i for i, r in enumerate(marked) if r["fits"]} == fit
        want = plan["rows"][min(fit)]
        r = leank_cli("chat", "--ctx-size", ctx, "--memory", budget)
        assert r.returncode == 0, r.stderr
        line = chosen_line(r.stderr)
        assert line.startswith(f"memory: {want['name']}") and want["policy"] in line, line


def test_chat_refuses_when_nothing_fits(leank_cli):
    r = leank_cli("chat", "--memory", "1MiB")
    assert_one_line_error(r, "--memory 1MiB: no cache fits: the smallest", "over the budget of 1.00 MiB", code=1)


def test_chat_keeps_a_given_kv_and_refuses_it_when_it_cannot_fit(leank_cli, default_model):
    m = default_model
    dense, kivi = plan_memory([(kind, build_policy(m, kv=kind)) for kind in ("dense", "kivi")], m.args,
                              loaded_weights(m.transformer), device="cpu", dtype=torch.float32, budget=0, context=2048)
    budget = max(dense.total, kivi.total)
    r = leank_cli("chat", "--kv", "kivi", "--ctx-size", 2048, "--memory", budget)  # dense fits too: kivi is kept
    assert r.returncode == 0 and chosen_line(r.stderr).startswith("memory: kivi (kivi; K 2-bit"), r.stderr
    r = leank_cli("chat", "--kv", "dense", "--ctx-size", 2048, "--memory", dense.total)
    assert r.returncode == 0 and chosen_line(r.stderr).startswith("memory: dense fits"), r.stderr
    r = leank_cli("chat", "--kv", "dense", "--ctx-size", 2048, "--memory", dense.total - 1)
    assert_one_line_error(r, "the dense cache you chose needs", f"weights {dense.weights / 2**20:.2f} MiB", code=1)


@pytest.fixture
def no_uvicorn(monkeypatch):
    """`leank serve` up to the point it would listen: the app it would serve is recorded instead."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(self.config.app))
    return served


@cpu_only
def test_serve_picks_the_least_compressed_that_fits_its_parallel_caches(leank_cli, default_model, no_uvicorn):
    parallel, ctx = 4, 8192
    m = default_model
    rows = plan_memory(planner_policies(m), m.args, loaded_weights(m.transformer), device="cpu", dtype=torch.float32,
                       budget=0, context=ctx, parallel=parallel, rows=PREFILL_CHUNK)
    totals = [r.total for r in rows]
    assert min(totals) < totals[0]  # four dense caches take more than the compressed ones with their working set
    for budget, fit in between(totals):
        want = rows[min(fit)]
        r = leank_cli("serve", "--parallel", parallel, "--memory", budget, "--port", 0)
        assert r.returncode == 0, r.stderr
        assert chosen_line(r.stderr).startswith(f"memory: {want.name}"), r.stderr
        assert f"KV cache: {want.policy.describe()} · {parallel} slot(s)" in r.stderr
    assert len(no_uvicorn) == len(between(totals))
    r = leank_cli("serve", "--parallel", parallel, "--memory", min(totals) - 1, "--port", 0)
    assert_one_line_error(r, "no cache fits", f"{parallel} x KV cache", "fewer --parallel", code=1)
    r = leank_cli("serve", "--parallel", parallel, "--kv", "dense", "--memory", totals[0] - 1, "--port", 0)
    assert_one_line_error(r, "the dense cache you chose", "or no --kv (--memory would choose", code=1)


# --- sizes ------------------------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size("2G") == parse_size("2g") == 2 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000000") == 1_000_000
    for bad in ("0", "abc", "-5G", "5 parsecs", "nan", "inf", "0.1", ""):
        with pytest.raises(LeankError):
            parse_size(bad)


@pytest.mark.parametrize("verb", ["info", "chat", "serve"])
@pytest.mark.parametrize("size", ["0", "abc", "-5G"])
def test_bad_sizes_are_one_usage_line(leank_cli, verb, size):
    r = leank_cli(verb, "--memory", size)
    assert_one_line_error(r, "--memory: give a size such as 8GiB, 512MiB or 2G", f"(got {size})", code=2)
