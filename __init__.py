"""leank: long-context LLM inference on ordinary machines.

GGUF models run in torch with a KV cache that LeanK channel masks prune and KIVI quantizes.

    import leank
    model = leank.load()                      # the bundled SmolLM2-135M-Instruct
    for text in model.generate("The capital of France is", max_tokens=16, temperature=0):
        print(text, end="")
"""
import os

# OpenMP threads that wait for work spin on a core (libgomp: 300,000 rounds) before they sleep. On a
# machine busy with other work a spinning thread holds the core its descheduled partner needs, and every
# barrier (ggml's matrix products, the attention kernels, torch's ops) then waits out a time slice:
# a 2-thread decode step of the 1.5B Qwen2.5-Coder took 1.1-3.9 s instead of 0.09 beside one busy
# process. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) cost 30-60 % on an idle machine (a futex wake per
# barrier: 120-150 ms a step); 3,000 rounds gave 100-102 ms idle (the default 86-92, in other runs) and
# kept the busy step near 0.2 s (bench/RESULTS.md, "Threads on a busy machine"). libgomp reads this when it loads, so it is set before
# torch is imported (importing torch first keeps libgomp's default); a policy already chosen wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from leank.errors import LeankError  # noqa: E402
from leank.runtime.cache.mask import Mask, Provenance  # noqa: E402
from leank.runtime.cache.policy import CachePolicy  # noqa: E402
from leank.runtime.engine import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "CachePolicy", "Mask", "Provenance", "LeankError", "__version__"]
