"""leank: long-context LLM inference on ordinary machines.

GGUF models run in torch with a KV cache that LeanK channel masks prune and KIVI quantizes.

    import leank
    model = leank.load()                      # the bundled SmolLM2-135M-Instruct
    for text in model.generate("The capital of France is", max_tokens=16, temperature=0):
        print(text, end="")
"""
import os

# OpenMP threads that wait for work spin on a core by default; on a machine busy with other work that
# stalled decode 3-14x (bench/RESULTS.md, "Threads on a busy machine"). Passive waiting must be set
# before torch loads its OpenMP runtime, so it is set here; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from leank.errors import LeankError  # noqa: E402
from leank.runtime.cache.mask import Mask, Provenance  # noqa: E402
from leank.runtime.cache.policy import CachePolicy  # noqa: E402
from leank.runtime.engine import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "CachePolicy", "Mask", "Provenance", "LeankError", "__version__"]
