"""`leank generate`: complete a prompt, streaming the text."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from leank.cli.options import (DEFAULTS, CtxSizeOpt, DebugOpt, DeviceOpt, DtypeOpt, FrequencyOpt, GroupOpt, JsonOpt,
                               KBitsOpt, KvOpt, MaskOpt, MaxTokensOpt, MinPOpt, ModelArg, ModelOpt, PresenceOpt,
                               RatioOpt, RecentOpt, RepeatLastNOpt, RepeatPenaltyOpt, SeedOpt, SinkOpt, StopOpt,
                               TempOpt, ThreadsOpt, TopKOpt, TopPOpt, VBitsOpt, check_ctx_size, load_model,
                               model_path, policy_from_options, read_text_file, sampling_from_options,
                               usage_error)
from leank.cli.output import print_generation_stats, print_json
from leank.errors import LeankError
from leank.runtime.defaults import MAX_TOKENS as DEFAULTS_MAX_TOKENS


def generate(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", show_default=False,
                                                  help="Text to continue; '-' reads standard input.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", metavar="FILE", show_default=False,
                                                 help="Read the prompt from this UTF-8 file (as llama.cpp's -f).")] = None,
    max_tokens: MaxTokensOpt = DEFAULTS_MAX_TOKENS,
    ctx_size: CtxSizeOpt = None,
    temperature: TempOpt = DEFAULTS["temperature"],
    top_k: TopKOpt = DEFAULTS["top_k"],
    top_p: TopPOpt = DEFAULTS["top_p"],
    min_p: MinPOpt = DEFAULTS["min_p"],
    repeat_penalty: RepeatPenaltyOpt = DEFAULTS["repeat_penalty"],
    repeat_last_n: RepeatLastNOpt = DEFAULTS["repeat_last_n"],
    presence_penalty: PresenceOpt = DEFAULTS["presence_penalty"],
    frequency_penalty: FrequencyOpt = DEFAULTS["frequency_penalty"],
    seed: SeedOpt = None,
    stop: StopOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as one user turn with the chat template.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and KV-cache memory after the text.")] = False,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
    model_option: ModelOpt = None, threads: ThreadsOpt = None, debug: DebugOpt = False,
):
    """Continue a prompt with MODEL, streaming the text as it is generated.

    Example: leank generate -p "The capital of France is" -n 16 --temp 0
    """
    if prompt is not None and file is not None:
        raise usage_error("--prompt", "pass the prompt with --prompt or --file, not both")
    if prompt is None and file is None:
        raise usage_error("--prompt", "no prompt: pass --prompt TEXT, --file FILE, or --prompt - to read standard input")
    if file is not None:
        prompt, source = read_text_file(file, "--file"), f"--file {file}"
    elif prompt == "-":
        prompt, source = sys.stdin.read(), "standard input"
    elif not prompt:
        raise usage_error("--prompt", "is empty")
    if not prompt:
        raise LeankError(f"no prompt: {source} is empty")
    m = load_model(model_path(model, model_option), device, dtype, quiet=json_out)
    limit = check_ctx_size(m, ctx_size)
    policy = policy_from_options(m, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    ids = m.chat_tokens([{"role": "user", "content": prompt}]) if chat else m.tokenize(prompt)
    if len(ids) >= limit:
        raise LeankError(f"the prompt ({len(ids)} tokens) does not fit a context of {limit} tokens")
    sampling = sampling_from_options(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                     presence_penalty, frequency_penalty, seed)
    pieces = []
    final = None
    for step in m.stream(ids, max_tokens=min(max_tokens, limit - len(ids)), stop=stop or (), policy=policy,
                         sampling=sampling):
        if step.text:
            pieces.append(step.text)
            if not json_out:
                sys.stdout.write(step.text)
                sys.stdout.flush()
        final = step
    s = final.stats
    if json_out:
        print_json({"text": "".join(pieces), "policy": policy.as_dict(), **s.as_dict()})
        return
    sys.stdout.write("\n")
    if stats:
        print_generation_stats(s, policy)
