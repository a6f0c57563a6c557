"""What a model takes in memory before it is loaded (issue 15, item 4): the weights' bytes from the GGUF
header, held to real loaded models, and the working set's estimate, held to what a prefill really holds."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leank.masks.choose import build_policy
from leank.runtime.decode import prefill
from leank.runtime.engine import open_header
from leank.runtime.memory import loaded_weights, planned_weights, weights_nbytes, working_set_nbytes


# --- the weights ------------------------------------------------------------------------------------------
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
