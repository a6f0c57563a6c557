"""Masks: binarization, importers (LeanK .pth and stage-1 .tsv), calibration, SPECs, `leank mask show`."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from leank.errors import LeankError
from leank.masks.binarize import aligned_counts, binarize, binarize_scores, straight_through_mask
from leank.masks.importers import import_leank_pth, import_stage1_tsv, read_stage1_tsv
from leank.runtime.cache.mask import Mask, Provenance
from leank.masks.spec import read_mask_source, resolve_mask
from leank.runtime.engine import open_header
from leank.runtime.model.rope import hf_to_gguf_permutation

# the shared data sits beside the repository (as SHARED in conftest.py, which importlib mode cannot import)
MASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "leank-masks"
README_STATS = {  # from ../shared/data/leank-masks/README.md
    "llama3.1-8b-instruct.pth": ("llama", (32, 8, 128), 0.3125, {0: 47, 32: 120, 64: 67, 96: 22}, 47),
    "qwen2.5-7b-instruct.pth": ("qwen2", (28, 4, 128), 0.290, {0: 35, 32: 34, 64: 33, 96: 10}, 35),
}


def released(name: str):
    path = MASKS / name
    if not path.is_file():
        pytest.skip(f"{path} is not there (the shared LeanK masks are optional test data)")
    return path


# --- binarization ------------------------------------------------------------------------------------
def reference_binarize(scores: np.ndarray, ratio: float, align: int) -> np.ndarray:
    """The stage-2 rule written out with loops: global top-k, per-head rounding, per-head top channels."""
    L, H, D = scores.shape
    k = int(round((1 - ratio) * scores.size))
    order = np.argsort(-scores.reshape(-1), kind="stable")
    inside = np.zeros(scores.size, dtype=bool)
    inside[order[:k]] = True
    inside = inside.reshape(L, H, D)
    out = np.zeros_like(inside)
    for l in range(L):
        for h in range(H):
            c = int(inside[l, h].sum())
            keep = (c + align // 2) // align * align
            out[l, h, np.argsort(-scores[l, h], kind="stable")[:keep]] = True
    return out


@pytest.mark.parametrize("shape", [(4, 3, 64), (6, 8, 128), (1, 1, 32)])
@pytest.mark.parametrize("align", [8, 16, 32])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 0.9, 1.0])
def test_binarize_respects_ratio_alignment_and_ranking(shape, align, ratio):
    g = torch.Generator().manual_seed(hash((shape, align, ratio)) % 2**31)
    # heads of very different scales, so that kept counts differ between heads
    scores = torch.rand(shape, generator=g) * torch.logspace(-2, 1, shape[0] * shape[1]).reshape(shape[0], shape[1], 1)
    kept = binarize_scores(scores, ratio, align)
    assert kept.dtype == torch.bool and kept.shape == scores.shape
    counts = kept.sum(-1)
    assert bool((counts % align == 0).all()), "every head keeps a multiple of align"
    # within each head the kept channels are exactly the top-scoring ones
    for l in range(shape[0]):
        for h in range(shape[1]):
            c = int(counts[l, h])
            if 0 < c < shape[2]:
                assert scores[l, h][kept[l, h]].min() > scores[l, h][~kept[l, h]].max()
    # the total is the target up to the per-head rounding (at most align/2 per head)
    target = (1 - ratio) * scores.numel()
    n_heads = shape[0] * shape[1]
    assert abs(int(kept.sum()) - target) <= n_heads * align / 2 + 1
    assert np.array_equal(kept.numpy(), reference_binarize(scores.numpy(), ratio, align))
    assert torch.equal(aligned_counts(scores, ratio, align), counts)


def test_binarize_extremes_and_ties():
    scores = torch.ones(2, 2, 32)  # one big plateau: ties are broken by position, not all-or-nothing
    assert not binarize_scores(scores, 1.0, 8).any()
    assert binarize_scores(scores, 0.0, 8).all()
    half = binarize_scores(scores, 0.5, 8)
    assert int(half.sum()) == 64 and bool((half.sum(-1) % 8 == 0).all())


def test_binarizing_a_released_mask_at_its_own_ratio_gives_it_back():
    raw = torch.load(released("llama3.1-8b-instruct.pth"), weights_only=True)
    ratio = 1 - float(raw.mean())
    assert torch.equal(binarize_scores(raw, ratio, 32), raw.bool())


def test_straight_through_mask_forward_is_binary_and_gradient_is_identity():
    scores = torch.rand(3, 2, 64, requires_grad=True)
    st = straight_through_mask(scores, 0.6, 16)
    assert torch.equal(st.detach().bool(), binarize_scores(scores, 0.6, 16))
    assert set(st.detach().unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn(3, 2, 64)
    (st * weights).sum().backward()
    assert torch.allclose(scores.grad, weights)


@pytest.mark.parametrize("ratio,align,shape,message", [
    (0.5, 12, (2, 2, 64), "align must be one of"),
    (0.5, 16, (2, 2, 24), "does not divide head_dim"),
    (1.5, 16, (2, 2, 64), "within [0, 1]"),
    (-0.1, 16, (2, 2, 64), "within [0, 1]"),
])
def test_binarize_rejects_bad_arguments(ratio, align, shape, message):
    with pytest.raises(LeankError, match=message.replace("[", r"\[").replace("]", r"\]")):
        binarize(torch.rand(shape), ratio, align)


def test_binarize_rejects_nan_and_records_provenance():
    scores = torch.rand(2, 2, 64)
    mask = binarize(scores, 0.5, 16, method="calib", source="test", seed=3)
    assert mask.provenance == Provenance("calib", 0.5, 16, "test", None, {"seed": 3})
    scores[0, 0, 0] = float("nan")
    with pytest.raises(LeankError, match="finite"):
        binarize(scores, 0.5, 16)


# --- LeanK .pth importer -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(README_STATS))
def test_released_masks_match_readme_statistics(name):
    arch, shape, kept, by_count, pruned = README_STATS[name]
    for order in (None, arch):  # the permutation moves channels within heads: statistics do not change
        mask = import_leank_pth(released(name), order)
        assert mask.shape == shape
        assert mask.kept_fraction == pytest.approx(kept, abs=5e-4)
        assert mask.heads_by_kept_count() == by_count
        assert mask.pruned_heads == pruned
        assert mask.provenance.method == "imported" and mask.provenance.align == 32
    assert import_leank_pth(released(name), None).provenance.extra["channel_order"] == "hf"


def test_llama_import_permutes_to_gguf_order_and_qwen_keeps_it():
    raw = torch.load(released("llama3.1-8b-instruct.pth"), weights_only=True).bool()
    gguf = import_leank_pth(released("llama3.1-8b-instruct.pth"), "llama").kept
    for i in (0, 5, 63):
        for s in (0, 1):  # HF channel s*64 + i is GGUF channel 2i + s
            assert torch.equal(gguf[..., 2 * i + s], raw[..., s * 64 + i])
    assert not torch.equal(gguf, raw)
    qraw = torch.load(released("qwen2.5-7b-instruct.pth"), weights_only=True).bool()
    assert torch.equal(import_leank_pth(released("qwen2.5-7b-instruct.pth"), "qwen2").kept, qraw)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_fails_cleanly_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if container == "torch-zip":
        torch.save({"mask": _Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(LeankError, match="not a loadable tensor file") as info:
        import_leank_pth(path, "llama")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickle's payload ran"


@pytest.mark.parametrize("content,message", [
    ({"a": torch.zeros(2, 2, 64)}, "found a dict"),
    (torch.zeros(2, 64), "3-D"),
    (torch.full((2, 2, 64), 0.5), "0 or 1"),
    (torch.zeros(2, 2, 63), "odd"),
])
def test_pth_with_wrong_content_is_refused(tmp_path, content, message):
    path = tmp_path / "m.pth"
    torch.save(content, path)
    with pytest.raises(LeankError, match=message):
        import_leank_pth(path, "llama")


def test_pth_garbage_huge_and_unknown_arch_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(LeankError, match="not a loadable tensor file"):
        import_leank_pth(garbage, "llama")
    huge = tmp_path / "huge.pth"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(LeankError, match="too large"):
        import_leank_pth(huge, "llama")
    sparse = tmp_path / "sparse.pth"
    torch.save(torch.zeros(2, 2, 64).to_sparse(), sparse)
    with pytest.raises(LeankError, match="plain dense tensor"):
        import_leank_pth(sparse, "llama")
    strided = tmp_path / "zero-strides.pth"  # 2^31 claimed elements over a one-element storage
    torch.save(torch.zeros(1).expand(4096, 4096, 128), strided)
    assert strided.stat().st_size < 10_000
    with pytest.raises(LeankError, match="far too large"):
        import_leank_pth(strided, "llama")
    ok = tmp_path / "ok.pth"
    torch.save(torch.ones(2, 2, 64), ok)
    with pytest.raises(LeankError, match="no known channel order"):
        import_leank_pth(ok, "gpt2")


# --- stage-1 .tsv importer -----------------------------------------------------------------------------
def write_stage1(path, scores: torch.Tensor) -> None:
    # as LeanK saves them: one line per layer, the layer's (heads, channels) factors flattened
    np.savetxt(path, scores.reshape(scores.shape[0], -1).numpy(), delimiter="\t")


def test_stage1_tsv_is_permuted_then_binarized(tmp_path):
    scores = torch.rand(5, 2, 64, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "alpha.tsv"
    write_stage1(path, scores)
    assert torch.allclose(read_stage1_tsv(path, 2, 64), scores)
    mask = import_stage1_tsv(path, 2, 64, 0.7, 16, "llama")
    expected = binarize_scores(scores[..., hf_to_gguf_permutation("llama", 64)], 0.7, 16)
    assert torch.equal(mask.kept, expected)
    assert bool((mask.kept_counts() % 16 == 0).all())
    assert mask.provenance.method == "imported" and mask.provenance.ratio == 0.7
    qwen = import_stage1_tsv(path, 2, 64, 0.7, 16, "qwen2")
    assert torch.equal(qwen.kept, binarize_scores(scores, 0.7, 16))


@pytest.mark.parametrize("text,message", [
    ("0.1\t0.2\n0.3\n", "line 2 has 1 values"),
    ("0.1\tabc\n", "not a number"),
    ("0.1\tnan\n", "NaN"),
    ("\n\n", "no scaling factors"),
])
def test_stage1_tsv_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(LeankError, match=message):
        read_stage1_tsv(path, 1, 2)


# --- calibration ---------------------------------------------------------------------------------------
def test_calibration_statistics_equal_a_direct_computation(make_tiny):
    """The cache wrapper's sums equal mean |q| (pooled per group) x mean |k| computed from Attention.qkv."""
    import leank
    from leank.masks.calib import SKIP_POSITIONS, channel_scores
    from leank.runtime.model.transformer import Attention

    model = leank.load(make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2), device="cpu")
    seqs = [list(range(5, 85)), list(range(100, 140))]
    captured = {}
    original = Attention.qkv

    def spy(self, *args, **kwargs):
        q, k, v = original(self, *args, **kwargs)
        captured.setdefault(self.layer, []).append((q.detach().clone(), k.detach().clone()))
        return q, k, v

    Attention.qkv = spy
    try:
        scores = channel_scores(model, seqs)
    finally:
        Attention.qkv = original
    for layer in range(2):
        qs = torch.cat([q[0, :, SKIP_POSITIONS:] for q, _ in captured[layer]], dim=1)  # (Hq, T, D)
        ks = torch.cat([k[0, :, SKIP_POSITIONS:] for _, k in captured[layer]], dim=1)  # (Hkv, T, D)
        q_mean = qs.abs().mean(1).reshape(2, 2, -1).mean(1)  # query heads 0,1 -> KV head 0; 2,3 -> 1
        expected = q_mean * ks.abs().mean(1)
        assert torch.allclose(scores[layer], expected, rtol=1e-5, atol=1e-7)


def test_calibration_prunes_dead_channels_first(tmp_path, make_tiny):
    """Zero the K projection rows of one RoPE pair of one head: calibration must prune exactly that pair."""
    import gguf

    import leank
    from leank.convert.writer import rewrite_gguf
    from leank.masks.calib import calibration_mask
    from leank.runtime.gguf.reader import GGUFFile

    src = GGUFFile(make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2))
    head_dim, head, pair = 16, 1, 3  # interleaved RoPE: pair 3 is channels 6 and 7
    rows = [head * head_dim + 2 * pair, head * head_dim + 2 * pair + 1]

    def zero_pair(t, data):
        if t.name != "blk.1.attn_k.weight":
            return None
        w = np.array(data, dtype=np.float32)
        w[rows] = 0.0
        return w, gguf.GGMLQuantizationType.F32

    path = tmp_path / "dead.gguf"
    rewrite_gguf(src, path, transform=zero_pair)
    model = leank.load(path, device="cpu")
    mask = calibration_mask(model, ratio=2 / (2 * 2 * head_dim), align=1, n_tokens=400, seq_len=200)
    assert int((~mask.kept).sum()) == 2
    assert not mask.kept[1, head, 2 * pair] and not mask.kept[1, head, 2 * pair + 1]
    assert mask.provenance.method == "calib" and mask.provenance.extra["arch"] == "llama"


def test_calibration_mask_is_deterministic_and_aligned(make_tiny):
    import leank
    from leank.masks.calib import calibration_documents, calibration_mask

    model = leank.load(make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2), device="cpu")
    a = calibration_mask(model, 0.5, 8, n_tokens=300, seq_len=150)
    b = calibration_mask(model, 0.5, 8, n_tokens=300, seq_len=150)
    assert a == b and bool((a.kept_counts() % 8 == 0).all())
    assert a.kept_fraction == pytest.approx(0.5, abs=4 / 16)
    docs = calibration_documents(8, seed=1)
    assert docs == calibration_documents(8, seed=1) and docs != calibration_documents(8, seed=2)
    assert len(set(docs)) == 8 and all(len(d) > 80 for d in docs)


# --- SPECs ---------------------------------------------------------------------------------------------
def test_every_spec_kind_resolves_for_a_model(tmp_path, make_tiny):
    path = make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2)
    h = open_header(path)
    shape = (2, 2, 16)
    assert resolve_mask("ones", h).kept.all()
    freq = resolve_mask("freq:0.5", h, align=8)
    assert freq.provenance.method == "freq" and freq.kept_fraction == 0.5
    calib = resolve_mask("calib:0.5:600", h, align=8)
    assert calib.provenance.method == "calib" and calib.shape == shape and calib.provenance.extra["tokens"] == 600
    native = tmp_path / "m.safetensors"
    calib.save(native)
    assert resolve_mask(str(native), h) == calib
    hf = torch.zeros(shape)
    hf[..., :4] = 1  # HF channels 0..3 are GGUF channels 0, 2, 4, 6 of a llama head
    pth = tmp_path / "m.pth"
    torch.save(hf, pth)
    assert resolve_mask(str(pth), h).kept[0, 0].nonzero().flatten().tolist() == [0, 2, 4, 6]
    tsv = tmp_path / "a.tsv"
    write_stage1(tsv, torch.rand(shape))
    assert resolve_mask(f"{tsv}:0.75", h, align=8).kept_fraction == pytest.approx(0.25, abs=0.25)
    assert resolve_mask(str(tsv), h, align=8).provenance.ratio == 0.7


def test_spec_mismatches_are_clear_errors(tmp_path, make_tiny):
    h = open_header(make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2))
    wrong_shape = tmp_path / "big.safetensors"
    Mask.ones(3, 2, 16).save(wrong_shape)
    with pytest.raises(LeankError, match=r"does not fit"):
        resolve_mask(str(wrong_shape), h)
    qwen_order = tmp_path / "qwen.safetensors"
    Mask(torch.ones(2, 2, 16, dtype=torch.bool), Provenance("calib", extra={"arch": "qwen2"})).save(qwen_order)
    with pytest.raises(LeankError, match="channel order of a qwen2 model"):
        resolve_mask(str(qwen_order), h)
    with pytest.raises(LeankError, match="no such file"):
        resolve_mask(str(tmp_path / "missing.safetensors"), h)
    with pytest.raises(LeankError, match="not a ratio"):
        resolve_mask("calib:lots", h)
    with pytest.raises(LeankError, match="not a token count"):
        resolve_mask("calib:0.5:many", h)
    with pytest.raises(LeankError, match=r"within \[0, 1\]"):
        resolve_mask("freq:1.5", h)
    with pytest.raises(LeankError, match="needs --model"):
        read_mask_source("freq:0.5")


# --- leank mask show / make ----------------------------------------------------------------------------
def read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:].reshape(h, w, 3)


def test_mask_show_json_and_png(tmp_path, leank_cli):
    from leank.masks.heatmap import HEAD_PRUNED, KEPT, PRUNED

    kept = torch.zeros(2, 2, 32, dtype=torch.bool)
    kept[0, 0, :8] = True
    kept[1, :, :] = True
    path = tmp_path / "m.safetensors"
    Mask(kept, Provenance("freq", 0.5, 8)).save(path)
    png = tmp_path / "m.png"
    code, out, err = leank_cli("mask", "show", path, "--json", "--png", png)
    assert code == 0, err
    report = json.loads(out)
    assert report["heads_by_kept_count"] == {"0": 1, "8": 1, "32": 2}
    assert report["fully_pruned"] == [[0, 1]] and report["kept_counts"] == [[8, 0], [32, 32]]
    img = read_png(png)
    cx = report["png"]["width"] // (2 * 32)  # channel width in pixels (2-pixel gap between heads)
    assert tuple(img[0, 0]) == KEPT and tuple(img[0, 8 * cx]) == PRUNED
    right = img.shape[1] - 1
    assert tuple(img[0, right]) == HEAD_PRUNED and tuple(img[img.shape[0] - 1, right]) == KEPT


def test_mask_show_text_of_released_mask(leank_cli):
    code, out, _ = leank_cli("mask", "show", released("llama3.1-8b-instruct.pth"), "--no-layers")
    assert code == 0
    assert "31.25 %" in out and "47 of 256" in out and "Hugging Face" in out


def test_mask_show_and_make_errors_are_one_line(tmp_path, leank_cli):
    tsv = tmp_path / "a.tsv"
    write_stage1(tsv, torch.rand(2, 2, 16))
    code, out, err = leank_cli("mask", "show", tsv)
    assert code == 1 and err.count("\n") == 1 and "needs --model" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a mask at all")
    code, _, err = leank_cli("mask", "show", bad)
    assert code == 1 and err.count("\n") == 1 and "not a readable mask file" in err


def test_mask_make_writes_a_native_file(tmp_path, leank_cli, make_tiny):
    model = make_tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2)
    out_path = tmp_path / "f.safetensors"
    code, _, err = leank_cli("mask", "make", "freq:0.5", "--model", model, "--align", "8", "-o", out_path, "--json")
    assert code == 0, err
    mask = Mask.load(out_path)
    assert mask.provenance.method == "freq" and mask.provenance.extra["arch"] == "llama"
    assert mask == resolve_mask("freq:0.5", open_header(model), align=8)
    code, _, err = leank_cli("mask", "make", "freq:0.5", "--model", model, "-o", out_path)
    assert code == 1 and "already exists" in err
