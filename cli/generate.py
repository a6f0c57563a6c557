"""`leank generate`: complete a prompt, streaming the text."""
from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from leank.cli.app import app
from leank.cli.common import (DeviceOpt, DtypeOpt, GroupOpt, JsonOpt, KBitsOpt, KvOpt, MaskOpt, ModelArg, RatioOpt,
                              RecentOpt, SinkOpt, VBitsOpt, err, load_model, policy_from_options, print_json)


@app.command()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue. '-' reads standard input.")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k likeliest (0 = all).")] = 40,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop at this string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as one user turn with the chat template.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and KV-cache memory after the text.")] = False,
    json_out: JsonOpt = False,
    kv: KvOpt = None, mask: MaskOpt = None, ratio: RatioOpt = None, k_bits: KBitsOpt = None, v_bits: VBitsOpt = None,
    group_size: GroupOpt = None, sink: SinkOpt = None, recent: RecentOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = None,
):
    """Continue PROMPT with MODEL, streaming the text as it is generated.

    Example: leank generate -p "The capital of France is" -n 16 -t 0
    """
    import sys

    from leank.errors import LeankError

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise LeankError("no prompt: pass --prompt TEXT (or --prompt - to read standard input)")
    m = load_model(model, device, dtype, quiet=json_out)
    policy = policy_from_options(m, kv, mask, ratio, k_bits, v_bits, group_size, sink, recent)
    ids = m.chat_tokens([{"role": "user", "content": prompt}]) if chat else m.tokenize(prompt)
    pieces = []
    final = None
    for step in m.stream(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         stop=stop or (), policy=policy):
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
        print_stats(s, policy)


def print_stats(s, policy) -> None:
    from leank.cli.common import cache_summary

    err.print(
        f"[dim]prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_second:.1f} tok/s | "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_second:.1f} tok/s | finish: {s.finish_reason}[/]"
    )
    err.print(f"[dim]{cache_summary(policy, s.cache)}[/]")
