"""Curation (``clapscale curate``) on real shards with a real (randomly initialised) tiny CLAP:

- chunked top-k equals a full numpy similarity matrix; the DS selection on hand-made embeddings
  keeps exactly the captions the rule names;
- DU, DS and ADS outputs equal an independent computation: clips embedded one by one through the
  inference API, captions one by one through the model, all similarities in numpy, thresholds and
  top-k applied there; audio bytes are copied unchanged;
- two gloo ranks write byte-identical output to one process (`clapscale curate` under a 2-rank group);
- a rerun resumes (skips the shards already done, redoes a missing one, same bytes) and refuses
  other parameters in the same --out.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clapscale.config import load_config
from clapscale.curate.pool import select_ds_captions
from clapscale.curate.run import CurateParams, Curator
from clapscale.curate.similarity import topk_cosine
from clapscale.errors import UserError
from clapscale.eval.zeroshot import prompts_for
from clapscale.shards.synthetic import generate
from clapscale.shards.writer import write_shards
from test_eval_gather import run_two_ranks
from test_inference import _tiny_text_dir

TOP_K = 2


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_topk_cosine_equals_full_matrix_for_any_chunking():
    rng = np.random.default_rng(0)
    q, k = _unit(rng.standard_normal((37, 8))), _unit(rng.standard_normal((101, 8)))
    full = q @ k.T
    want_i = np.argsort(-full, axis=1, kind="stable")[:, :5]
    for rows, cols in ((4096, 65536), (5, 7), (1, 1), (37, 100)):
        v, i = topk_cosine(torch.from_numpy(q).float(), torch.from_numpy(k).float(), 5, row_chunk=rows, col_chunk=cols)
        np.testing.assert_array_equal(i.numpy(), want_i)
        np.testing.assert_allclose(v.numpy(), np.take_along_axis(full, want_i, 1), atol=1e-6)
    v, i = topk_cosine(torch.from_numpy(q).float(), torch.from_numpy(k[:3]).float(), 5, col_chunk=2)
    assert v.shape == (37, 3)  # k capped at the number of keys


def test_ds_selection_on_hand_made_embeddings():
    # Two labels on the x and y axes; captions at known angles from them (cosines written beside).
    def at(deg):
        r = np.deg2rad(deg)
        return [np.cos(r), np.sin(r), 0.0]

    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    caps = torch.tensor([at(0), at(20), at(40), at(50), at(80), at(90), [0, 0, 1.0], at(30)], dtype=torch.float32)
    # nearest-label cosines: 1, .940, .766, .766, .985, 1, 0, .866
    kept, best, nearest = select_ds_captions(caps, labels, 0.8, 0)
    assert kept.tolist() == [0, 1, 4, 5, 7]
    assert nearest.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    np.testing.assert_allclose(best.numpy(), [1, 0.9397, 0.7660, 0.7660, 0.9848, 1, 0, 0.8660], atol=1e-4)
    # At most 2 per label: x keeps 0 (1.0) and 1 (.94); y keeps 5 (1.0) and 4 (.985); 7 (.866) drops.
    kept, _, _ = select_ds_captions(caps, labels, 0.8, 2)
    assert kept.tolist() == [0, 1, 4, 5]
    kept, _, _ = select_ds_captions(caps, labels, 0.95, 2)
    assert kept.tolist() == [0, 4, 5]


# ---------------------------------------------------------------------------------------------
# Real shards, real tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clapscale.models import build_model, save_model

    root = tmp_path_factory.mktemp("curate")
    write_shards(generate("train", 10, seed=1), root / "pool", "train", shard_size=5)
    write_shards(generate("valid", 7, seed=5), root / "wild", "valid", shard_size=3)
    cfg = load_config(
        "configs/tiny.yaml",
        [f"model.text.path={_tiny_text_dir(root / 'text')}", "model.text.pretrained=false", "model.embed_dim=32",
         "data.workers=0"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_model(model, cfg, root / "model")
    return {"root": root, "cfg": cfg, "model": model, "pool": str(root / "pool/train/{000000..000001}.tar"),
            "wild": str(root / "wild/valid/{000000..000002}.tar")}


def _read_tars(paths) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tar in paths:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def reference(setup):
    """Independent embeddings: each clip alone through the inference API, each caption alone."""
    from clapscale.data.wds import decode_audio
    from clapscale.inference import load

    clap = load(setup["root"] / "model", device="cpu")
    wild = _read_tars(sorted((setup["root"] / "wild/valid").glob("*.tar")))
    pool = _read_tars(sorted((setup["root"] / "pool/train").glob("*.tar")))
    wild_keys = sorted(wild)
    audio = torch.cat([clap.embed_audio(decode_audio(wild[k]["flac"], setup["cfg"].audio), sample_rate=48000)
                       for k in wild_keys]).numpy()
    pool_meta = {k: json.loads(v["json"]) for k, v in pool.items()}
    captions = sorted({c for m in pool_meta.values() for c in m["text"]})
    caps = torch.cat([clap.embed_text([c]) for c in captions]).numpy()
    labels = sorted({t for m in pool_meta.values() for t in m["tag"]})
    lab = _unit(torch.cat([clap.embed_text(prompts_for(x)) for x in labels]).numpy())
    return {"wild": wild, "pool": pool, "pool_meta": pool_meta, "wild_keys": wild_keys, "audio": audio,
            "captions": captions, "caps": caps, "labels": labels, "label_emb": lab}


def _threshold_in_gap(values: np.ndarray, quantile: float) -> float:
    """A threshold near ``quantile`` of ``values`` at least 1e-5 from every value, so no pair is borderline
    (the two paths agree to ~1e-6; a random tiny model's clips all lie within ~1e-3 of each other)."""
    v = np.sort(values.ravel())
    gaps = [(i, v[i + 1] - v[i]) for i in range(len(v) - 1) if v[i + 1] - v[i] > 2e-5]
    i = min(gaps, key=lambda g: abs(g[0] - quantile * len(v)))[0]
    return float((v[i] + v[i + 1]) / 2)


def _curate(setup, out, **kw) -> dict:
    params = CurateParams(pool=setup["pool"], batch_size=4, workers=0, **kw)
    return Curator(setup["model"], setup["cfg"], params, out, teacher_path=str(setup["root"] / "model"),
                   progress=False).run()


def _output(out: Path) -> dict[str, dict]:
    got = _read_tars(sorted((out / "train").glob("*.tar")))
    return {k: {**json.loads(v["json"]), "_flac": v["flac"]} for k, v in got.items()}


def _expected_alignment(ref, cap_index, sigma):
    sims = ref["audio"] @ ref["caps"][cap_index].T
    want = {}
    for row, key in enumerate(ref["wild_keys"]):
        order = np.argsort(-sims[row], kind="stable")[:TOP_K]
        hits = [(ref["captions"][cap_index[j]], sims[row, j]) for j in order if sims[row, j] >= sigma]
        if hits:
            want[key] = hits
    return want, sims


def _check_alignment(got, want, ref, strategy):
    assert sorted(got) == sorted(want)
    for key, hits in want.items():
        g = got[key]
        assert g["text"] == [c for c, _ in hits]
        np.testing.assert_allclose(g["curate"]["similarity"], [s for _, s in hits], atol=5e-6)
        assert g["curate"]["strategy"] == strategy and g["curate"]["source_key"] == key
        assert g["_flac"] == ref["wild"][key]["flac"]  # audio copied, not re-encoded
        assert g["tag"] == []  # the wild set's labels are hidden from the student


def test_du_matches_independent_computation(setup, reference, tmp_path):
    ref = reference
    cap_index = np.arange(len(ref["captions"]))
    sigma = _threshold_in_gap((ref["audio"] @ ref["caps"].T).max(1), 0.5)
    want, sims = _expected_alignment(ref, cap_index, sigma)
    assert 0 < len(want) < len(ref["wild_keys"]), "the threshold must keep some clips and drop others"
    summary = _curate(setup, tmp_path / "du", strategy="du", wild=setup["wild"], sigma=sigma, top_k=TOP_K)
    _check_alignment(_output(tmp_path / "du"), want, ref, "du")
    c = summary["counts"]
    assert c["clips"] == 7 and c["pool_captions"] == len(ref["captions"]) == c["captions_matched_against"]
    assert c["kept_clips"] == len(want) and c["kept_pairs"] == sum(map(len, want.values()))
    best = sims.max(1)
    assert summary["best_similarity"]["at_threshold"]["0.5"] == int((best >= 0.5).sum())
    assert sum(summary["best_similarity"]["histogram"]) == 7
    manifest = json.loads((tmp_path / "du" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == len(want)
    assert len(manifest["curation"]["teacher"]["sha256"]) == 64
    assert "<- this run" in (tmp_path / "du" / "summary.txt").read_text()


def test_ds_and_ads_match_independent_computation(setup, reference, tmp_path):
    ref = reference
    cap_label = ref["caps"] @ ref["label_emb"].T
    best = cap_label.max(1)
    ds_t = _threshold_in_gap(best, 0.5)
    chosen = np.flatnonzero(best >= ds_t)
    assert 0 < len(chosen) < len(ref["captions"])

    _curate(setup, tmp_path / "ds", strategy="ds", label_shards=setup["pool"], ds_threshold=ds_t)
    got = _output(tmp_path / "ds")
    chosen_caps = {ref["captions"][j] for j in chosen}
    want = {k: [c for c in dict.fromkeys(m["text"]) if c in chosen_caps] for k, m in ref["pool_meta"].items()}
    want = {k: v for k, v in want.items() if v}
    assert {k: g["text"] for k, g in got.items()} == want
    for k, g in got.items():
        assert g["_flac"] == ref["pool"][k]["flac"] and g["tag"] == ref["pool_meta"][k]["tag"]
        idx = [ref["captions"].index(c) for c in g["text"]]
        np.testing.assert_allclose(g["curate"]["similarity"], best[idx], atol=1e-4)
        assert g["curate"]["label"] == [ref["labels"][int(np.argmax(cap_label[j]))] for j in idx]

    sims = ref["audio"] @ ref["caps"][chosen].T
    sigma = _threshold_in_gap(sims.max(1), 0.5)
    want, _ = _expected_alignment(ref, chosen, sigma)
    assert 0 < len(want) < len(ref["wild_keys"])
    summary = _curate(setup, tmp_path / "ads", strategy="ads", wild=setup["wild"], labels=ref["labels"],
                      ds_threshold=ds_t, sigma=sigma, top_k=TOP_K)
    _check_alignment(_output(tmp_path / "ads"), want, ref, "ads")
    assert summary["counts"]["captions_matched_against"] == len(chosen)
    assert summary["ds"]["pool_captions_kept"] == len(chosen)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


_CLI = """
import sys, torch
torch.set_num_threads(1)
from clapscale.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_ranks_write_what_one_process_writes(setup, reference, tmp_path):
    ref = reference
    labels = ",".join(ref["labels"])
    sigma = _threshold_in_gap((ref["audio"] @ ref["caps"].T).max(1), 0.3)
    args = ["curate", "--teacher", str(setup["root"] / "model"), "--strategy", "ads", "--pool", setup["pool"],
            "--wild", setup["wild"], "--labels", labels, "--ds-threshold", "-1", "--sigma", str(sigma),
            "--top-k", "2", "--batch-size", "3", "--workers", "0", "--device", "cpu"]
    ranks = run_two_ranks(_CLI, args + ["--out", str(tmp_path / "two")], timeout=150)
    for rc, out, err in ranks:
        assert rc == 0, err[-3000:]
    from clapscale.cli import main

    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert [k for k in one if k.startswith("train/") and k.endswith(".tar")], "no shard written"
    for name in one:
        assert one[name] == two[name], name
    assert "curation ADS" in ranks[0][1] and ranks[1][1] == ""  # rank 0 prints the summary


def test_rerun_resumes_and_refuses_other_parameters(setup, reference, tmp_path):
    ref = reference
    sigma = _threshold_in_gap((ref["audio"] @ ref["caps"].T).max(1), 0.1)
    kw = dict(strategy="du", wild=setup["wild"], sigma=sigma, top_k=1)
    out = tmp_path / "du"
    _curate(setup, out, **kw)
    before = _tree(out)
    assert "train/000001.tar" in before
    stamp = {p: (out / p).stat().st_mtime_ns for p in ("train/000000.tar", "train/000002.tar", "parts/000000.json")}
    # An interrupted run: shard 1 never finished (no part, no tar), the manifest not yet written.
    for p in ("parts/000001.json", "train/000001.tar", "train/000001.idx", "manifest.json", "summary.txt"):
        (out / p).unlink()
    _curate(setup, out, **kw)
    assert _tree(out) == before
    assert {p: (out / p).stat().st_mtime_ns for p in stamp} == stamp  # done shards were not redone

    with pytest.raises(UserError, match="other parameters.*sigma"):
        _curate(setup, out, **{**kw, "sigma": sigma + 0.01})
    with pytest.raises(UserError, match="needs --wild"):
        CurateParams(strategy="ads", pool=setup["pool"], labels=["a", "b"]).validate()
    with pytest.raises(UserError, match="needs --labels or --label-shards"):
        CurateParams(strategy="ds", pool=setup["pool"]).validate()


def test_cli_user_errors_are_one_line(setup, tmp_path, capsys):
    from clapscale.cli import main

    base = ["curate", "--teacher", str(setup["root"] / "model"), "--pool", setup["pool"], "--out", str(tmp_path / "o")]
    cases = [
        (["--strategy", "ds"], "needs --labels or --label-shards"),
        (["--strategy", "ds", "--labels", "dog,dog"], "at least two labels"),
        (["--strategy", "du", "--wild", str(tmp_path / "none-*.tar")], "no file matches"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
