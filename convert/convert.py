"""`leank convert`: embed a mask and cache settings in a GGUF file, as `leank.*` metadata only.

The output is the input, byte for byte, plus `leank.*` keys (see docs/FORMAT.md): every metadata key
and tensor is copied unchanged, tensors are streamed (`leank.convert.writer.rewrite_gguf`), the write
is atomic, and the input is never modified. Converting a converted file replaces its `leank.*` keys.
Stock llama.cpp ignores the extra keys, so it runs the output exactly as it ran the input.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from leank.convert.inspect import model_summary
from leank.convert.writer import rewrite_gguf
from leank.errors import LeankError
from leank.masks.choose import NO_MASK, build_policy
from leank.masks.choose import choose_mask as choose_mask_for
from leank.runtime.cache.mask import Mask
from leank.runtime.cache.policy import CachePolicy
from leank.runtime.engine import open_header
from leank.runtime.gguf.schema import PREFIX, k_fingerprint, write_leank_metadata


@dataclass
class ConvertResult:
    input: Path
    output: Path
    policy: CachePolicy
    fingerprint: str
    bytes_written: int
    copy_seconds: float  # streaming the tensors and the header, fsync included
    seconds: float  # the whole conversion: reading the header, making the mask, writing
    mask_origin: str  # "spec", "embedded" (kept from the input), "shipped", "given" or "none"
    notes: list[str] = field(default_factory=list)

    @property
    def mb_per_second(self) -> float:
        return self.bytes_written / 1e6 / self.copy_seconds if self.copy_seconds else float("inf")

    def as_dict(self) -> dict:
        return {"input": str(self.input), "output": str(self.output), "fingerprint": self.fingerprint,
                "bytes_written": self.bytes_written, "copy_seconds": self.copy_seconds, "seconds": self.seconds,
                "mb_per_second": self.mb_per_second, "peak_rss_bytes": peak_rss_bytes(),
                "mask_origin": self.mask_origin, "policy": self.policy.as_dict(), "notes": self.notes}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def choose_mask(header, mask: str | Mask | None, align: int | None = None, progress=None) -> tuple[Mask | None, str]:
    """The mask to embed and where it came from (`leank.masks.choose.choose_mask`, without a generated
    fallback): with no `mask`, the input's embedded one, else the learned mask shipped for this model,
    else an error naming the SPECs to choose from."""
    chosen, origin = choose_mask_for(header, mask, align=align, generated_fallback=False, progress=progress)
    if origin == "missing":
        raise LeankError(f"{header.path.name}: no learned mask ships for this model; choose one with --mask SPEC, e.g. "
                         "--mask freq:0.7 (training-free, instant), --mask calib:0.7 (calibrated on generated text), "
                         "a LeanK .pth, a mask file, or --mask none (quantization only)")
    return chosen, origin


def convert(model: str | Path, output: str | Path, mask: str | Mask | None = None, *, align: int | None = None,
            k_bits: int | None = None, v_bits: int | None = None, group_size: int | None = None,
            sink_tokens: int | None = None, recent_tokens: int | None = None, block_tokens: int | None = None,
            rotate: bool | None = None, force: bool = False, progress: Callable[[int, int], None] | None = None,
            mask_progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Write `output`: `model` (a GGUF file) with a mask and cache policy embedded as `leank.*` metadata.

    `mask` is a SPEC (`leank.masks.spec`), a `Mask`, "none", or None (see `choose_mask`). Unset cache
    settings keep the input's embedded ones, else the runtime defaults (no quantization: 16 bits).
    `progress(bytes_done, bytes_total)` follows the copy; `mask_progress` a calibration.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if output.exists() and not force:  # fail before any slow work (rewrite_gguf checks again)
        raise LeankError(f"{output}: already exists (use --force to overwrite)")
    header = open_header(model, tolerate_invalid_policy=True)
    notes = header.notes
    chosen, origin = choose_mask(header, mask, align, mask_progress)
    # the one path from user choices to a policy; unset settings keep the input's, else the defaults
    policy = build_policy(header, mask=chosen if chosen is not None else NO_MASK, k_bits=k_bits, v_bits=v_bits,
                          group_size=group_size, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                          block_tokens=block_tokens, rotate=rotate)
    fingerprint = k_fingerprint(header.file)
    try:
        stats = rewrite_gguf(header.file, output, force=force, drop_keys=lambda key: key.startswith(PREFIX),
                             add_metadata=lambda writer: write_leank_metadata(writer, policy, fingerprint),
                             progress=progress)
    except LeankError:
        raise
    except Exception as e:  # anything the GGUF writer raises: rewrite_gguf has removed its temporary file
        raise LeankError(f"{output}: conversion failed ({type(e).__name__}: {e}); no output was written") from e
    return ConvertResult(header.path, output, policy, fingerprint, stats.bytes_written, stats.seconds,
                         time.perf_counter() - t0, origin, notes)


def inspect_file(path: str | Path | None, ctx: int | None = None) -> dict:
    """`leank info`'s model summary of a GGUF file, plus what its `leank.*` metadata holds and implies.

    The summary's `kv_cache` is computed under the embedded policy (dense for a plain file); `leank` is
    None for a plain file. A fingerprint mismatch is an error (the runtime would refuse the file).
    """
    summary = model_summary(path, ctx=ctx)
    lk = summary.get("leank")
    if lk is None:
        summary["leank"] = None
        return summary
    policy = lk["policy"]
    lk["fingerprint_matches"] = True  # open_header checked it
    lk["mask"] = policy.get("mask")
    lk["kv_bytes_per_token"] = {
        "fp16_dense": summary["kv_cache"]["fp16_bytes_per_token"],
        "middle_region": summary["kv_cache"]["middle_bytes_per_token"],
        "average_at_context": summary["kv_cache"]["bytes_per_token"],
        "context": summary["kv_cache"]["context"],
    }
    return summary
