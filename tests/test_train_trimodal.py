"""Tri-modal (AudioCLIP) and bi-bi-modal (VIP-ANT) training: 2 gloo ranks under torchrun and DeepSpeed
on synthetic shards with rendered pictures, bounded, with the trainer's own evaluation at the end.

- AudioCLIP: all three pairs trained, every tower moves (a CPU-sized audio tower: ESResNeXt on two
  ranks does not fit this shared machine's memory; its eval path is tested in test_eval_trimodal.py).
- VIP-ANT: (audio, image) + (image, text) with the image and text towers frozen and no projection on
  them (the pivot): the exported model's image and text towers equal their initial weights, the audio
  tower moved, and zero-shot / retrieval (audio -> text through the pivot) run in evaluation. Its
  batches come from the DALI backend, AudioCLIP's from the webdataset backend: both loaders' pictures
  reach the trainer.
"""

import subprocess
import sys

import pytest
import torch

from test_train_runs import REPO, _env, _ok, _records, _train

CPU_TOWERS = ["model.audio.name=cnn", "model.audio.size=tiny", "model.text.name=minilm",
              "model.image.name=clip", "model.image.size=tiny", "data.image_size=32"]


@pytest.fixture(scope="module")
def picture_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("picture_shards")
    subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "60", "--synthetic-images", "--out",
                    str(out), "--shard-size", "12", "--quiet"], cwd=REPO, env=_env(PYTHONPATH=str(REPO)),
                   check=True, timeout=120)
    train = sorted((out / "train").glob("*.tar"))
    return f"{out}/train/{{{train[0].stem}..{train[-1].stem}}}.tar", f"{out}/valid/000000.tar"


def _args(shards, out_dir, name, *extra):
    train, val = shards
    return ["configs/tiny.yaml", f"data.train={train}", f"data.val={val}", f"train.out_dir={out_dir}",
            f"train.name={name}", "data.batch_size=4", "train.steps=3", "train.eval_every=0", "train.log_every=1",
            "train.checkpoint_every=0", "optim.warmup_steps=1", "loss.kind=pairwise", *CPU_TOWERS, *extra]


def _initial_model(run_dir):
    """The model as the trainer built it before step 1 (same config, same seed)."""
    from clapscale.config import load_config
    from clapscale.models import build_model
    from clapscale.train.loop import _seed_everything

    cfg = load_config(str(run_dir / "model" / "config.yaml"))
    _seed_everything(cfg.train.seed)
    return build_model(cfg)


def _changed(a, b, prefix):
    sa, sb = a.state_dict(), b.state_dict()
    names = [n for n in sa if n.startswith(prefix) and sa[n].is_floating_point()]
    assert names, prefix
    return any(not torch.equal(sa[n], sb[n].reshape(sa[n].shape)) for n in names)


@pytest.mark.slow
def test_audioclip_trimodal_trains_on_two_ranks(picture_shards, tmp_path):
    _ok(_train(2, _args(picture_shards, tmp_path, "audioclip", "model.embed_dim=128",
                        "loss.weight_audio_text=1", "loss.weight_audio_image=1", "loss.weight_image_text=1"),
                timeout=400))
    run = tmp_path / "audioclip"
    losses = [r["loss"] for r in _records(run) if "loss" in r and "event" not in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # Three pairs of InfoNCE over a global batch of 8: each starts near ln 8.
    assert 3 * 1.0 < losses[0] < 3 * 4.0

    from clapscale.models import load_model
    from clapscale.models.trimodal import TriModalClap

    trained, _ = load_model(run / "model")
    assert isinstance(trained, TriModalClap)
    init = _initial_model(run)
    for tower in ("audio_tower.", "text_tower.", "image_tower.", "image_projection."):
        assert _changed(trained, init, tower), tower
    evals = [r["eval"] for r in _records(run) if "eval" in r]
    assert len(evals) == 1 and "zeroshot/top1" in evals[0]


@pytest.mark.slow
def test_vipant_bi_bi_modal_trains_audio_only_through_the_frozen_pivot(picture_shards, tmp_path):
    _ok(_train(2, _args(picture_shards, tmp_path, "vipant", "model.embed_dim=384", "model.pivot=true",
                        "model.image.frozen=true", "model.text.frozen=true", "eval.tasks=[retrieval, zeroshot, image_retrieval]",
                        "data.backend=dali",  # DALI decodes the pictures (AudioCLIP's run reads with webdataset)
                        "train.grad_accum=2",  # GradCache with the frozen pivot's rows as constants
                        "loss.weight_audio_text=0", "loss.weight_audio_image=1", "loss.weight_image_text=1"),
                timeout=400))
    run = tmp_path / "vipant"
    from clapscale.models import load_model

    trained, _ = load_model(run / "model")
    init = _initial_model(run)
    assert _changed(trained, init, "audio_tower.") and _changed(trained, init, "audio_projection.")
    assert not _changed(trained, init, "image_tower.") and not _changed(trained, init, "text_tower.")
    assert not any(n.startswith(("text_projection.", "image_projection.")) for n in trained.state_dict())
    # Audio -> text was never trained on pairs; the trainer's evaluation still scores it through the pivot.
    evals = [r["eval"] for r in _records(run) if "eval" in r]
    assert len(evals) == 1
    assert "zeroshot/top1" in evals[0] and "retrieval/a2t/R@1" in evals[0]
    assert "image_retrieval/a2i/R@1" in evals[0] and "image_retrieval/i2a/R@1" in evals[0]

    # Inference loads the exported tri-modal model and classifies audio through the pivot.
    import numpy as np

    from clapscale.inference import load

    clap = load(run / "model", device="cpu")
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(48000) / 48000)).astype(np.float32)
    probs = clap.zero_shot(tone, ["low tone", "white noise"], sample_rate=48000)
    assert probs.shape == (1, 2) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert clap.embed_audio(tone, sample_rate=48000).shape == (1, 384)
