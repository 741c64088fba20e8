"""Evaluation of a tri-modal model: audio<->image retrieval against a direct computation, zero-shot
audio -> text through the pivot, and the config refusals that keep modalities consistent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clapscale.config import ConfigError, load_config
from test_train_runs import REPO, _env

TINY = ["model.audio.name=cnn", "model.audio.size=tiny", "model.text.name=minilm", "model.image.name=clip",
        "model.image.size=tiny", "data.image_size=32", "model.embed_dim=384", "model.pivot=true",
        "loss.kind=pairwise", "loss.weight_audio_text=0", "loss.weight_audio_image=1", "loss.weight_image_text=1",
        "audio.length_policy=repeatpad"]


@pytest.fixture(scope="module")
def val_spec(tmp_path_factory):
    out = tmp_path_factory.mktemp("pictures")
    subprocess.run([sys.executable, "tools/make_shards.py", "--synthetic", "120", "--synthetic-images", "--out",
                    str(out), "--quiet"], cwd=REPO, env=_env(PYTHONPATH=str(REPO)), check=True, timeout=120)
    return f"{out}/valid/000000.tar"


def test_image_retrieval_and_pivot_zeroshot_match_a_direct_computation(val_spec):
    from clapscale.data import build_loader
    from clapscale.eval.runner import evaluate_tasks
    from clapscale.features import AudioFrontend
    from clapscale.models import build_model, build_tokenizer

    cfg = load_config(None, [*TINY, f"data.val={val_spec}", "eval.batch_size=5"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    results = {r.task: r for r in evaluate_tasks(model, cfg, rank=0, world_size=1, device="cpu",
                                                 tasks=["image_retrieval", "zeroshot"])}

    # Direct: every clip's audio against every clip's picture, one batch at a time, no eval code.
    frontend = AudioFrontend(cfg.audio)
    audio, images, keys, tags = [], [], [], []
    with torch.no_grad():
        for batch in build_loader(cfg, val_spec, train=False):
            mel, longer = frontend(batch)
            audio.append(model.encode_audio(mel, longer))
            images.append(model.encode_image(batch["image"]))
            keys += batch["keys"]
            tags += batch["tags"]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    a, v = torch.cat(audio)[order], torch.cat(images)[order]
    sim = a @ v.T
    n = len(keys)
    a2i_r1 = 100.0 * (sim.argmax(dim=1) == torch.arange(n)).float().mean().item()
    i2a_r1 = 100.0 * (sim.argmax(dim=0) == torch.arange(n)).float().mean().item()
    m = results["image_retrieval"].metrics
    assert m["a2i/R@1"] == pytest.approx(a2i_r1) and m["i2a/R@1"] == pytest.approx(i2a_r1)
    assert results["image_retrieval"].chance["a2i/R@1"] == pytest.approx(100.0 / n)

    # Zero-shot through the pivot: audio against the frozen text tower's prompt embeddings.
    labels = sorted({t for clip in tags for t in clip})
    tok = build_tokenizer(cfg.model.text)
    with torch.no_grad():
        prompts = tok([f"This is a sound of {label}." for label in labels])
        text = model.encode_text(prompts["input_ids"], prompts["attention_mask"])
    pred = (a @ text.T).argmax(dim=1)
    # Multi-label clips: top-1 counts the best label being any of the clip's tags.
    top1 = 100.0 * sum(labels[int(p)] in tags[i] for p, i in zip(pred, order)) / n
    assert results["zeroshot"].metrics["top1"] == pytest.approx(top1)


def test_modalities_must_agree_in_the_config():
    with pytest.raises(ConfigError, match="need an image tower"):
        load_config(None, ["loss.kind=pairwise", "loss.weight_audio_image=1"])
    with pytest.raises(ConfigError, match="trains with the pairwise loss"):
        load_config(None, ["model.image.name=clip", "data.image_size=224"])
    with pytest.raises(ConfigError, match="needs data.image_size"):
        load_config(None, ["model.image.name=clip", "loss.kind=pairwise", "loss.weight_audio_image=1"])
    with pytest.raises(ConfigError, match="image_retrieval"):
        load_config(None, ["eval.tasks=[retrieval, image_retrieval]"])
    with pytest.raises(ConfigError, match="pivot=true needs an image tower"):
        load_config(None, ["model.pivot=true"])
    assert load_config(None, [*TINY, "train.grad_accum=2"]).train.grad_accum == 2  # accumulation: GradCache


def test_pivot_needs_tower_widths_equal_to_embed_dim():
    from clapscale.models import build_model

    cfg = load_config(None, [*TINY, "model.embed_dim=512"])
    with pytest.raises(ConfigError, match=r"own 384-d embedding .* set model.embed_dim=384"):
        build_model(cfg)


def test_waveform_tower_is_evaluated_on_the_clips_samples(val_spec):
    """ESResNeXt reads the waveform: the evaluation (and trainer / inference, via the same
    ``tower_input``) hands it (B, 1, N) clips; a mel-only (DALI) batch is refused with a clear error."""
    from clapscale.eval.runner import evaluate_tasks
    from clapscale.features import AudioFrontend, tower_input
    from clapscale.models import build_model

    cfg = load_config(None, ["model.audio.name=esresnext", "model.audio.size=50", "model.text.name=minilm",
                             "audio.clip_seconds=0.25", "audio.length_policy=repeatpad", f"data.val={val_spec}",
                             "eval.batch_size=8", "eval.max_clips=8"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (result,) = evaluate_tasks(model, cfg, rank=0, world_size=1, device="cpu", tasks=["retrieval"])
    assert result.info["clips"] == 8 and 0.0 <= result.metrics["t2a/R@1"] <= 100.0

    frontend = AudioFrontend(cfg.audio)
    wave = torch.randn(2, cfg.audio.clip_samples)
    batch = {"waveform": wave, "is_longer": torch.zeros(2, dtype=torch.bool)}
    x, _ = tower_input(frontend, batch, "waveform")
    assert torch.equal(x, wave.unsqueeze(1))
    mel, _ = frontend(batch)
    dali_batch = {"mel": mel[:, 0], "is_longer": batch["is_longer"]}
    with pytest.raises(ValueError, match="data.backend=wds"):
        tower_input(frontend, dali_batch, "waveform")



def test_clip_image_tower_loads_a_clip_checkpoints_visual_tensors(tmp_path):
    """``model.image.path``: the ``visual.*`` tensors of a CLIP checkpoint (open_clip layout) initialise
    the tower exactly; a checkpoint for another image size is refused naming the mismatch."""
    from clapscale.models.checkpoint import CheckpointMismatchError
    from clapscale.models.image import ClipImageTower

    torch.manual_seed(1)
    source = ClipImageTower("tiny", image_size=32, embed_dim=64)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in source.vit.state_dict().items()}
                | {"module.logit_scale": torch.tensor(4.6)}}, path)
    torch.manual_seed(2)
    tower = ClipImageTower("tiny", image_size=32, embed_dim=64)
    tower.load_pretrained(str(path))
    for name, value in source.vit.state_dict().items():
        torch.testing.assert_close(tower.vit.state_dict()[name], value, msg=name)
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(image), source(image))
    with pytest.raises(CheckpointMismatchError, match="positional_embedding"):
        ClipImageTower("tiny", image_size=64, embed_dim=64).load_pretrained(str(path))
