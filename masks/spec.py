"""Turn a mask SPEC from the command line into a `Mask` for a given model.

SPEC is one of:
- `ones` (keep every channel: the compressed cache without pruning);
- `freq:RATIO` (training-free, RoPE frequencies), e.g. `freq:0.7`;
- `calib:RATIO` or `calib:RATIO:TOKENS` (training-free, |q|*|k| statistics of the model over TOKENS tokens
  of generated text, default 4096; loads and runs the model);
- a native mask file (`.safetensors`, written by `leank mask make` or `Mask.save`);
- a LeanK released mask (`.pth`), put into the model's GGUF channel order;
- LeanK stage-1 scaling factors (`.tsv`, or `FILE.tsv:RATIO`), binarized at RATIO (default 0.7);
- a converted GGUF file: the mask embedded in it.
`align` (default 16) applies to the masks made here from scores: freq, calib and .tsv.
"""
from __future__ import annotations

from pathlib import Path

from leank.errors import LeankError, SpecError
from leank.masks.calib import DEFAULT_TOKENS, calibration_mask
from leank.masks.freq import frequency_mask
from leank.masks.importers import import_leank_pth, import_stage1_tsv
from leank.runtime import defaults
from leank.runtime.arch.args import read_model_args
from leank.runtime.cache.mask import Mask
from leank.runtime.engine import open_header
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.gguf.schema import read_leank_metadata
from leank.runtime.model.rope import rope_mode

KINDS_HELP = "ones, freq:RATIO, calib:RATIO, a mask file (.safetensors), a LeanK .pth or stage-1 .tsv, or a converted .gguf"


def _ratio(text: str, spec: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise SpecError(f"mask spec {spec!r}: {text!r} is not a ratio like 0.7") from None
    if not 0.0 <= r <= 1.0:
        raise SpecError(f"mask spec {spec!r}: the ratio must be within [0, 1]")
    return r


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 1 << 24:
        raise SpecError(f"mask spec {spec!r}: {text!r} is not a token count like 4096")
    return int(text)


def split_tsv_spec(spec: str) -> tuple[Path, float] | None:
    """`FILE.tsv` or `FILE.tsv:RATIO` -> (path, ratio); None for anything else."""
    if spec.lower().endswith(".tsv"):
        return Path(spec), defaults.RATIO
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".tsv"):
        return Path(head), _ratio(tail, spec)
    return None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def embedded_mask(path: str | Path) -> Mask:
    """The mask a converted GGUF embeds (its fingerprint checked); an error when it has none."""
    f = GGUFFile(path)
    meta = read_leank_metadata(f, read_model_args(f))
    if meta is None or meta.mask is None:
        raise LeankError(f"{path}: no embedded leank mask (leank convert embeds one)")
    return meta.mask


def resolve_mask(spec: str, model, align: int | None = None, *, progress=None) -> Mask:
    """The mask `spec` names, checked against `model`'s shape and architecture.

    `model` is a `leank.Model` or a header (`leank.runtime.engine.open_header`); `calib:` loads the
    weights of a header's file. `progress(done, total)` reports calibration tokens.
    """
    args = model.args
    align = align or defaults.ALIGN
    tsv = split_tsv_spec(spec)
    if spec == "ones":
        mask = Mask.ones(args.n_layers, args.n_kv_heads, args.head_dim)
    elif spec.startswith("freq:"):
        mask = frequency_mask(args, _ratio(spec[5:], spec), align)
    elif spec.startswith("calib:"):
        ratio, _, tokens = spec[6:].partition(":")
        n_tokens = _count(tokens, spec) if tokens else DEFAULT_TOKENS
        mask = calibration_mask(model, _ratio(ratio, spec), align, n_tokens=n_tokens, progress=progress)
    elif tsv is not None:
        mask = import_stage1_tsv(tsv[0], args.n_kv_heads, args.head_dim, tsv[1], align, args.arch)
    else:
        path = Path(spec)
        if not path.exists():
            raise LeankError(f"mask {spec!r}: no such file; a SPEC is {KINDS_HELP}")
        mask = load_mask_file(path, args.arch)
    made_for = mask.provenance.extra.get("arch")
    if made_for is not None and rope_mode(str(made_for)) != rope_mode(args.arch):
        raise LeankError(f"mask {spec!r} is in the channel order of a {made_for} model ({rope_mode(str(made_for))} RoPE); "
                         f"{model.path.name} is {args.arch} ({rope_mode(args.arch)} RoPE)")
    mask.check_fits(args.n_layers, args.n_kv_heads, args.head_dim, f"{model.path.name}")
    return mask


def read_mask_source(source: str, arch: str | None = None, model=None, align: int | None = None) -> Mask:
    """The mask `source` names, for display: like `resolve_mask` when `model` (a path or header) is
    given; without it, files only, a LeanK .pth in `arch`'s GGUF order or, with no `arch` either, in its
    own order (its provenance then says `channel_order: hf`)."""
    if model is not None:
        if not hasattr(model, "args"):
            model = open_header(model)
        if arch is not None and rope_mode(arch) != rope_mode(model.args.arch):
            raise LeankError(f"--arch {arch} contradicts the model, which is {model.args.arch}")
        return resolve_mask(source, model, align)
    path = Path(source)
    if split_tsv_spec(source) is not None or source == "ones" or source.startswith(("freq:", "calib:")):
        raise LeankError(f"{source!r}: needs --model to know the model's heads and channels")
    if not path.exists():
        raise LeankError(f"{source}: no such file")
    return load_mask_file(path, arch)


def load_mask_file(path: Path, arch: str | None) -> Mask:
    """A mask file of any kind: a LeanK .pth (put into `arch`'s GGUF order; its own order without
    `arch`), a converted GGUF's embedded mask, or a native mask file."""
    if path.is_dir():
        raise LeankError(f"{path}: is a directory, not a mask file")
    if path.exists() and not path.is_file():  # a named pipe would block the reads below, a device never end
        raise LeankError(f"{path}: not a regular file")
    if path.suffix.lower() in (".pth", ".pt"):
        return import_leank_pth(path, arch)
    if is_gguf(path):
        return embedded_mask(path)
    return Mask.load(path)
