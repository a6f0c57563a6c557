"""leank: long-context LLM inference on ordinary machines.

GGUF models run in torch with a KV cache that LeanK channel masks prune and KIVI quantizes.

    import leank
    model = leank.load()                      # the bundled SmolLM2-135M-Instruct
    for text in model.generate("The capital of France is", max_tokens=16, temperature=0):
        print(text, end="")
"""
from leank.errors import LeankError
from leank.runtime.cache.mask import Mask, Provenance
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.engine import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "CachePolicy", "Mask", "Provenance", "LeankError", "__version__"]
