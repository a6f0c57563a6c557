"""`leank convert` and `leank inspect`: round trips, byte-identical copies, atomic failure, the runtime
reading converted files, and llama.cpp running them unchanged."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import leank
from leank.convert.convert import convert
from leank.runtime.gguf.schema import PREFIX, k_fingerprint, read_leank_metadata, write_leank_metadata
from leank.errors import LeankError
from leank.runtime.cache.mask import Mask, Provenance
from leank.runtime.arch.args import read_model_args
from leank.runtime.gguf.reader import GGUFFile
from leank.runtime.cache.policy import CachePolicy
from leank.masks.choose import build_policy

TINY = dict(n_layers=2, dim=128, n_heads=4, n_kv_heads=2)  # head_dim 32
def assert_one_line_error(r, *fragments):
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory: Path, keep=()) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def read_back(path):
    f = GGUFFile(path)
    return f, read_leank_metadata(f, read_model_args(f))


def assert_same_except_leank(src: Path, dst: Path, out: GGUFFile) -> None:
    """`dst` is `src` byte for byte, except the `leank.*` keys after the original ones (and the padding).

    Uses the output's parsed layout only: the input's metadata bytes, tensor table and tensor data must
    reappear unchanged around the added keys."""
    a, b = src.read_bytes(), dst.read_bytes()
    fields = list(out.fields.values())
    leank_fields = [f for f in fields if f.name.startswith(PREFIX)]
    assert leank_fields and all(f.name.startswith(PREFIX) for f in fields[len(fields) - len(leank_fields):]), \
        "the leank keys come after every original key"
    assert a[:16] == b[:16], "magic, version and tensor count unchanged"
    n_kv_in, n_kv_out = (int.from_bytes(x[16:24], "little") for x in (a, b))
    assert n_kv_out == n_kv_in + len(leank_fields)
    first_leank = leank_fields[0].offset
    assert a[24:first_leank] == b[24:first_leank], "every original key and value, byte for byte"
    infos = list(out.tensors.values())
    info_start = infos[0].info_offset
    info_end = infos[-1].info_offset + infos[-1].info_nbytes
    n_info = info_end - info_start
    assert a[first_leank : first_leank + n_info] == b[info_start:info_end], "tensor table unchanged"
    alignment = out.get("general.alignment", 32)
    data_out = min(t.data_offset for t in out.tensors.values())
    data_in = first_leank + n_info + (-(first_leank + n_info)) % alignment
    assert data_out == info_end + (-info_end) % alignment
    assert len(a) - data_in == len(b) - data_out and a[data_in:] == b[data_out:], "tensor data byte-identical"


@pytest.fixture
def tiny(make_tiny) -> Path:
    return make_tiny(**TINY)


# --- round trips ---------------------------------------------------------------------------------------
def test_round_trip_tiny_llama(tmp_path, tiny):
    out = tmp_path / "out.gguf"
    before = sha256(tiny)
    r = convert(tiny, out, "freq:0.5", align=8, k_bits=4, v_bits=2, group_size=16, sink_tokens=8, recent_tokens=64)
    assert sha256(tiny) == before, "the input is never modified"
    expected = CachePolicy(mask=r.policy.mask, k_bits=4, v_bits=2, group_size=16, sink_tokens=8, recent_tokens=64)
    assert r.policy == expected and r.mask_origin == "spec"
    f, meta = read_back(out)
    assert meta.policy == expected and meta.version == 1
    assert meta.mask == r.policy.mask and meta.mask.provenance == r.policy.mask.provenance
    assert meta.fingerprint == k_fingerprint(GGUFFile(tiny)) == r.fingerprint
    assert_same_except_leank(tiny, out, f)
    src = GGUFFile(tiny)
    for name in src.keys():  # values and types, key by key
        assert f.get(name) == src.get(name) and f.field_type(name) == src.field_type(name), name
    assert set(f.keys()) - set(src.keys()) == {k for k in f.keys() if k.startswith(PREFIX)}
    assert list(f.tensors) == list(src.tensors)
    assert leftovers(tmp_path) == ["out.gguf"]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_round_trip_other_archs_with_calibrated_and_imported_masks(tmp_path, make_tiny, arch):
    path = make_tiny(arch=arch, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=32)
    out = tmp_path / "calib.gguf"
    r = convert(path, out, "calib:0.5:512", align=8)
    f, meta = read_back(out)
    assert meta.mask == r.policy.mask and meta.mask.provenance.extra["arch"] == arch
    assert meta.mask.provenance.extra["tokens"] == 512
    assert_same_except_leank(path, out, f)
    pth = tmp_path / "m.pth"
    hf = torch.zeros(2, 2, 32)
    hf[..., :8] = 1
    torch.save(hf, pth)
    r = convert(path, tmp_path / "pth.gguf", str(pth))
    assert torch.equal(read_back(tmp_path / "pth.gguf")[1].mask.kept, hf.bool()), "qwen keeps the HF order"


def test_reconverting_replaces_leank_keys_and_is_idempotent(tmp_path, tiny):
    once, twice, other = tmp_path / "once.gguf", tmp_path / "twice.gguf", tmp_path / "other.gguf"
    convert(tiny, once, "freq:0.5", align=8, k_bits=4, v_bits=4)
    convert(once, twice, "freq:0.5", align=8, k_bits=4, v_bits=4)
    assert once.read_bytes() == twice.read_bytes(), "converting a converted file the same way changes nothing"
    r = convert(once, other, "ones", sink_tokens=4)  # unset settings keep the input's
    f, meta = read_back(other)
    assert meta.mask.kept.all() and (meta.policy.k_bits, meta.policy.v_bits, meta.policy.sink_tokens) == (4, 4, 4)
    assert len([k for k in f.keys() if k == "leank.version"]) == 1
    assert_same_except_leank(tiny, other, f)
    # no --mask: the embedded mask is kept
    r = convert(once, tmp_path / "kept.gguf", k_bits=2)
    assert r.mask_origin == "embedded" and r.policy.mask == read_back(once)[1].mask and r.policy.k_bits == 2


def test_no_mask_means_quantization_only_or_a_clear_error(tmp_path, tiny):
    r = convert(tiny, tmp_path / "kivi.gguf", "none", k_bits=2, v_bits=2)
    _, meta = read_back(tmp_path / "kivi.gguf")
    assert meta.mask is None and meta.policy.kind == "kivi" and r.policy == meta.policy
    with pytest.raises(LeankError, match="--mask freq:0.7"):
        convert(tiny, tmp_path / "x.gguf")
    assert leftovers(tmp_path) == ["kivi.gguf"]


# --- failures leave nothing behind ---------------------------------------------------------------------
def test_mask_mismatch_errors_leave_no_output(tmp_path, tiny):
    wrong = tmp_path / "wrong.safetensors"
    Mask.ones(3, 2, 32).save(wrong)
    with pytest.raises(LeankError, match="does not fit"):
        convert(tiny, tmp_path / "a.gguf", str(wrong))
    qwen = tmp_path / "qwen.safetensors"
    Mask(torch.ones(2, 2, 32, dtype=torch.bool), Provenance("calib", extra={"arch": "qwen2"})).save(qwen)
    with pytest.raises(LeankError, match="channel order of a qwen2 model"):
        convert(tiny, tmp_path / "b.gguf", str(qwen))
    with pytest.raises(LeankError, match="does not fit"):
        convert(tiny, tmp_path / "c.gguf", Mask.ones(2, 2, 64))
    with pytest.raises(LeankError, match="bits must be one of"):
        convert(tiny, tmp_path / "d.gguf", "ones", k_bits=3)
    assert leftovers(tmp_path) == ["qwen.safetensors", "wrong.safetensors"]


def test_existing_output_needs_force_and_input_is_never_the_output(tmp_path, tiny):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(LeankError, match="already exists"):
        convert(tiny, out, "ones")
    assert out.read_bytes() == b"precious"
    convert(tiny, out, "ones", force=True)
    assert read_back(out)[1].mask.kept.all()
    copy = tmp_path / "model.gguf"
    shutil.copy(tiny, copy)
    before = sha256(copy)
    with pytest.raises(LeankError, match="is an input of this command"):
        convert(copy, copy, "ones", force=True)
    assert sha256(copy) == before
    with pytest.raises(LeankError, match="missing does not exist"):
        convert(tiny, tmp_path / "missing" / "x.gguf", "ones")
    assert leftovers(tmp_path) == ["model.gguf", "out.gguf"]


def test_truncated_input_is_a_clear_error(tmp_path, tiny):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-1000])
    with pytest.raises(LeankError, match="truncated"):
        convert(cut, tmp_path / "out.gguf", "ones")
    assert leftovers(tmp_path) == ["cut.gguf"]


def test_full_disk_leaves_no_partial_file(tmp_path, tiny, monkeypatch):
    """The disk fills up half-way through the tensors (ENOSPC from a real write call)."""
    import leank.convert.writer as writer

    real = writer._stream_bytes
    calls = [0]

    def filling_up(fin, fout, offset, nbytes):
        calls[0] += 1
        if calls[0] == 10:
            fout.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fin, fout, offset, nbytes)

    monkeypatch.setattr(writer, "_stream_bytes", filling_up)
    with pytest.raises(LeankError, match="No space left on device") as info:
        convert(tiny, tmp_path / "out.gguf", "ones")
    assert "no output was left behind" in str(info.value)
    assert calls[0] == 10 and leftovers(tmp_path) == []


def test_file_size_limit_hit_mid_write_via_cli(tmp_path, tiny):
    """A real failing write: the process may not write files over 200 KB (RLIMIT_FSIZE gives EFBIG)."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
              "from leank.cli.app import main; sys.argv = ['leank'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", script, "convert", tiny, "--mask", "ones", "-o", tmp_path / "out.gguf"],
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "out.gguf: writing failed", "File too large", "no output was left behind")
    assert leftovers(tmp_path) == []


def _drop_dac_override():
    """In a child about to exec: remove CAP_DAC_OVERRIDE from the capability bounding set, so that even
    root is refused by file permissions (prctl PR_CAPBSET_DROP = 24, CAP_DAC_OVERRIDE = 1)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
        os._exit(99)


def test_read_only_target_directory(tmp_path, tiny, leank_process):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(LeankError, match="not writable"):
                convert(tiny, ro / "out.gguf", "ones")
        else:  # root writes anywhere unless it loses CAP_DAC_OVERRIDE: run the command without it
            r = leank_process("convert", tiny, "--mask", "ones", "-o", ro / "out.gguf", preexec_fn=_drop_dac_override)
            assert_one_line_error(r, "not writable")
        assert leftovers(ro) == []
    finally:
        ro.chmod(0o755)


# --- the CLI and the runtime ---------------------------------------------------------------------------
def test_cli_convert_inspect_and_errors(tmp_path, tiny, leank_cli):
    out = tmp_path / "out.gguf"
    r = leank_cli("convert", tiny, "--mask", "freq:0.5", "--align", "8", "--k-bits", "4", "--v-bits", "4", "--sink", "16",
            "--recent", "64", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["policy"]["k_bits"] == 4 and report["bytes_written"] > 0 and report["peak_rss_bytes"] > 0
    r = leank_cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    lk = s["leank"]
    assert lk["fingerprint_matches"] and lk["mask"]["kept_fraction"] == 0.5
    assert lk["policy"]["sink_tokens"] == 16 and lk["kv_bytes_per_token"]["middle_region"] < lk["kv_bytes_per_token"]["fp16_dense"]
    r = leank_cli("inspect", out)
    assert r.returncode == 0 and "embedded mask" in r.stdout and "50.00 %" in r.stdout
    r = leank_cli("inspect", tiny)
    assert r.returncode == 0 and "none (a plain GGUF file" in r.stdout
    assert_one_line_error(leank_cli("convert", tiny, "--mask", "freq:0.5", "-o", out), "already exists")
    assert_one_line_error(leank_cli("convert", tiny, "--mask", "freq:abc", "-o", tmp_path / "x.gguf"), "not a ratio")
    assert_one_line_error(leank_cli("convert", tiny, "-o", tmp_path / "x.gguf"), "--mask SPEC")
    assert leftovers(tmp_path) == ["out.gguf"]


def test_runtime_uses_the_embedded_policy_and_options_override(tmp_path, tiny, leank_cli):
    out = tmp_path / "out.gguf"
    r = convert(tiny, out, "freq:0.5", align=8, k_bits=4, v_bits=4, sink_tokens=4, recent_tokens=32)
    m = leank.load(out, device="cpu")
    assert m.policy == r.policy
    assert build_policy(m) == r.policy, "no options: the file's policy"
    p = build_policy(m, k_bits=2, recent_tokens=64)
    assert (p.k_bits, p.v_bits, p.recent_tokens, p.mask) == (2, 4, 64, r.policy.mask)
    assert build_policy(m, kv="dense").is_dense
    # and the compressed cache actually runs from it
    ids = m.tokenize("the quick brown fox jumps over the lazy dog " * 8)
    text = "".join(m.generate(ids, max_tokens=4, temperature=0))
    assert isinstance(text, str)
    assert m.new_cache().policy == r.policy
    # the same through `leank generate`
    for extra, k_bits in (([], 4), (["--k-bits", "2"], 2)):
        g = leank_cli("generate", out, "-p", "hello", "-n", "2", "--temp", "0", "--json", *extra)
        assert g.returncode == 0, g.stderr
        policy = json.loads(g.stdout)["policy"]
        assert (policy["kind"], policy["k_bits"], policy["sink_tokens"]) == ("leank+kivi", k_bits, 4)
        assert policy["mask"]["kept_fraction"] == r.policy.mask.kept_fraction


def test_fingerprint_mismatch_is_a_clear_error(tmp_path, make_tiny, leank_cli):
    """leank metadata made for model A, pasted into model B of the same shape."""
    from leank.convert.writer import rewrite_gguf

    a, b = make_tiny(**TINY), make_tiny(**TINY, seed=1)
    policy = CachePolicy(mask=Mask.ones(2, 2, 32))
    forged = tmp_path / "forged.gguf"
    fp_a = k_fingerprint(GGUFFile(a))
    rewrite_gguf(GGUFFile(b), forged, add_metadata=lambda w: write_leank_metadata(w, policy, fp_a))
    with pytest.raises(LeankError, match="different model"):
        leank.load(forged, device="cpu")
    assert_one_line_error(leank_cli("generate", forged, "-p", "hi", "-n", "1"), "fingerprint mismatch")
    # converting it again repairs it (the invalid metadata is noted and replaced)
    r = convert(forged, tmp_path / "fixed.gguf", "ones")
    assert r.notes and "invalid leank metadata" in r.notes[0]
    assert leank.load(tmp_path / "fixed.gguf", device="cpu").policy.mask.kept.all()


# --- the real default model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_default(default_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "smollm2-leank.gguf"
    result = convert(default_model_path, out, "freq:0.7", align=16, k_bits=4, v_bits=4)
    return result, GGUFFile(out)


def test_default_model_round_trip_and_byte_identical_tensors(converted_default, default_model_path):
    result, f = converted_default
    meta = read_leank_metadata(f, read_model_args(f))
    assert meta.policy == result.policy and meta.mask == result.policy.mask
    assert meta.mask.provenance == result.policy.mask.provenance  # ratio 0.7 survives float32
    assert meta.mask.shape == (30, 3, 64) and meta.mask.kept_fraction == pytest.approx(0.25)
    assert_same_except_leank(Path(default_model_path), result.output, f)
    assert result.bytes_written > 90e6


def test_default_model_llama_cpp_logits_identical(converted_default, default_model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    result, _ = converted_default

    def logits(path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        ids = llm.tokenize(b"The capital of France is Paris, and the capital of Italy is")
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    original, converted = logits(default_model_path), logits(result.output)
    assert original.shape[0] > 10 and np.isfinite(original).all()
    assert np.array_equal(original, converted)
