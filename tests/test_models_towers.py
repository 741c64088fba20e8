"""Towers one by one: CNN14's parameter count against PANNs, the audio ViT's CLIP initialisation,
CLIP / BERT text towers, gradient checkpointing, construction errors, `clapscale models`."""

from __future__ import annotations

import json

import pytest
import torch

from clapscale.config import ConfigError, load_config
from clapscale.models import build_audio_tower, build_model, build_tokenizer
from clapscale.models.audio.cnn import build_cnn


def test_cnn14_parameter_count_matches_panns():
    tower = build_cnn("14", audioset_head=True)
    # Closed form: bn0 over 64 mels; six blocks of two bias-free 3x3 convs + two BatchNorms
    # (weight and bias); fc1 2048x2048; the 527-class AudioSet head.
    chans = [1, 64, 128, 256, 512, 1024, 2048]
    expected = 2 * 64
    for cin, cout in zip(chans, chans[1:]):
        expected += 9 * cin * cout + 9 * cout * cout + 2 * (2 * cout)
    expected += 2048 * 2048 + 2048 + 2048 * 527 + 527
    n = sum(p.numel() for p in tower.parameters())
    assert n == expected
    assert n == pytest.approx(80.8e6, abs=0.1e6)  # PANNs, Table: CNN14 80.8M parameters
    assert tower.out_dim == 2048


def test_tiny_cnn_is_cpu_sized():
    tower = build_cnn("tiny")
    n = sum(p.numel() for p in tower.parameters())
    assert 0.25e6 <= n <= 2e6


def test_audio_vit_from_clip_image_weights(tmp_path):
    from open_clip.transformer import VisionTransformer

    from clapscale.models.audio.vit import VIT_B32

    torch.manual_seed(0)
    clip_visual = VisionTransformer(**VIT_B32)
    torch.save({"state_dict": {"visual." + k: v for k, v in clip_visual.state_dict().items()}}, tmp_path / "clip.pt")
    cfg = load_config("configs/tiny.yaml", ["model.audio.name=vit", "model.audio.size=base",
                                            f"model.audio.pretrained={tmp_path / 'clip.pt'}"])
    tower = build_audio_tower(cfg.model, cfg.audio).eval()
    vit = tower.vit
    # conv1: the RGB kernel averaged into one channel, overlapping 16 x 24 strides.
    torch.testing.assert_close(vit.conv1.weight, clip_visual.conv1.weight.mean(1, keepdim=True))
    assert vit.conv1.stride == (16, 24)
    # 7x7 position grid bilinearly resized to (61 time, 2 freq) patches; CLS position kept.
    assert tower.grid == (61, 2) and vit.positional_embedding.shape == (1 + 61 * 2, 768)
    torch.testing.assert_close(vit.positional_embedding[0], clip_visual.positional_embedding[0])
    grid = clip_visual.positional_embedding[1:].reshape(7, 7, 768)
    resized = vit.positional_embedding[1:].reshape(61, 2, 768)
    # Bilinear, half-pixel centres: freq 7 -> 2 samples source columns 1.25 and 4.75; the first
    # time step maps below row 0 and clamps to it.
    torch.testing.assert_close(resized[0, 0], 0.75 * grid[0, 1] + 0.25 * grid[0, 2])
    torch.testing.assert_close(resized[0, 1], 0.25 * grid[0, 4] + 0.75 * grid[0, 5])
    assert torch.equal(vit.proj, clip_visual.proj)
    with torch.no_grad():
        out = tower(torch.randn(2, 4, 1001, 64), torch.zeros(2, dtype=torch.bool))
    assert out.shape == (2, 512)


def test_clip_text_tower_and_checkpoint(tmp_path):
    from open_clip.transformer import TextTransformer

    from clapscale.models.text import CLIP_TEXT

    torch.manual_seed(0)
    reference = TextTransformer(**CLIP_TEXT).eval()
    # OpenAI CLIP layout: text weights at top level beside visual.*.
    state = dict(reference.state_dict())
    state["visual.proj"] = torch.zeros(768, 512)
    torch.save(state, tmp_path / "clip.pt")
    cfg = load_config("configs/tiny.yaml", ["model.text.name=clip", f"model.text.path={tmp_path / 'clip.pt'}"])
    model = build_model(cfg).eval()
    tok = build_tokenizer(cfg.model.text)(["a dog barks", "rain on a roof"])
    assert tok["input_ids"].shape == (2, 77)
    with torch.no_grad():
        ours = model.text_tower(tok["input_ids"], tok["attention_mask"])
        ref = reference(tok["input_ids"])
    torch.testing.assert_close(ours, ref)
    assert model.encode_text(**tok).shape == (2, 512)


def test_bert_random_init_from_a_config_directory(tmp_path):
    from transformers import BertConfig, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "rain", "falls"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    cfg = load_config("configs/tiny.yaml", ["model.text.name=bert", f"model.text.path={tmp_path}",
                                            "model.text.pretrained=false"])
    model = build_model(cfg).eval()
    tok = build_tokenizer(cfg.model.text)(["a dog barks", "rain falls"])
    assert tok["input_ids"][0, 0].item() == 2  # [CLS]
    with torch.no_grad():
        pooled = model.text_tower(**tok)
        out = model.text_tower.encoder(**tok)
    torch.testing.assert_close(pooled, out.pooler_output)
    assert model.encode_text(**tok).shape == (2, 512)

    # Pretrained loading is strict: a file without the pooler BERT pooling needs is refused, where
    # transformers alone would initialise the pooler randomly and only log it.
    from transformers import BertModel

    from clapscale.models import CheckpointMismatchError

    BertModel(BertConfig.from_pretrained(tmp_path), add_pooling_layer=False).save_pretrained(tmp_path)
    cfg.model.text.pretrained = True
    with pytest.raises(CheckpointMismatchError, match=r"pooler\.dense"):
        build_model(cfg)


def test_missing_text_weights_fail_offline_with_the_field_named():
    cfg = load_config("configs/tiny.yaml", ["model.text.name=roberta", "model.text.path=/nonexistent/roberta"])
    with pytest.raises(ValueError, match=r"model\.text\.path='/nonexistent/roberta'"):
        build_model(cfg)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        tower = build_cnn("tiny").train()
        tower.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        tower(torch.randn(2, 1, 301, 64), None).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_cnn_fusion_drops_out_the_fused_map_like_laion_cnn14():
    """LAION-CLAP's Cnn14 (pann_model.py) fuses block 1's global map with the local chunks, *then* applies
    the 0.2 dropout that PANNs puts after every block: the local branch is dropped out too. So the input
    of block 2 must be dropout(fused): each element either 0 or fused / (1 - p), about p of them 0."""
    torch.manual_seed(0)
    tower = build_cnn("tiny", fusion="aff").train()
    p = tower.spec.block_dropout
    seen = {}
    tower.fusion_model.register_forward_hook(lambda m, args, out: seen.__setitem__("fused", out.detach()))
    tower.conv_block2.register_forward_pre_hook(lambda m, args: seen.__setitem__("block2_in", args[0].detach()))
    tower(torch.randn(2, 4, 1001, 64), torch.tensor([True, True]))
    fused, block2_in = seen["fused"], seen["block2_in"]  # both (2, 16, 250, 16): every sample is longer
    assert fused.shape == block2_in.shape
    live = fused != 0
    dropped = (block2_in == 0) & live
    kept = (block2_in != 0) & live
    torch.testing.assert_close(block2_in[kept], fused[kept] / (1 - p))
    assert dropped.sum() / live.sum() == pytest.approx(p, abs=0.01)


def test_htsat_gradient_checkpointing_gives_the_same_gradients():
    from clapscale.models.audio.htsat import HTSAT, htsat_config

    # A narrow HTSAT (same code path, 1/3 the width) keeps the test fast on CPU.
    config = htsat_config("tiny", "none", 64, 1001)
    config.patch_embeds_hidden_size, config.hidden_size, config.num_attention_heads = 32, 256, [1, 2, 4, 8]
    torch.manual_seed(0)
    tower = HTSAT(config=config).train()
    mel = torch.randn(1, 1, 1001, 64)
    grads = []
    for enable in (False, True):
        tower.set_grad_checkpointing(enable)
        tower.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # drop path draws the same masks in both runs (checkpoint replays RNG)
        tower(mel, None).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.audio.name=htsat", "audio.n_mels=48", "audio.f_max=14000"], r"audio\.n_mels=48 does not fit HTSAT"),
        (["model.audio.name=htsat", "audio.n_mels=128"], r"exceed HTSAT's 512 frames for audio\.n_mels=128"),
        (["model.audio.name=vit", "model.audio.size=base", "model.audio.fusion=aff"],
         r"model\.audio\.fusion='aff' but model\.audio\.name='vit' has no feature fusion"),
    ],
)
def test_construction_errors_name_the_field(overrides, message):
    cfg = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)


def test_models_command_lists_cnn_counts(capsys):
    from clapscale.models.cli import models_main

    assert models_main(["--audio", "cnn", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_size = {r["size"]: r for r in rows}
    assert set(by_size) == {"tiny", "6", "10", "14"}
    # Without the AudioSet head: 80.8M - (2048 * 527 + 527).
    assert by_size["14"]["params"] == pytest.approx(80.8e6 - 1.08e6, abs=0.1e6)
    assert 30 < by_size["14"]["gflops"] < 50  # ~20 G multiply-adds per 10 s clip
    assert by_size["tiny"]["gflops"] < 1
