"""Architectures: one module per GGUF `general.architecture` in this folder, found by its name (a new
architecture is one new file here: its `ARCH`, see `base.Architecture`), and the hyper-parameters every
architecture shares (`args`)."""
from __future__ import annotations

import importlib
import pkgutil
import re

from leank.runtime.arch.base import Architecture

_NOT_ARCHITECTURES = {"args", "base"}


def names() -> list[str]:
    """The architectures leank runs, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_ARCHITECTURES)


def get(name: str) -> Architecture | None:
    """The architecture called `name` (a file's `general.architecture`: untrusted), or None."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name not in names():
        return None
    return importlib.import_module(f"{__name__}.{name}").ARCH
