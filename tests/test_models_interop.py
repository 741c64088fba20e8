"""Interop with transformers' ClapModel (export / import, numerical parity on the same random weights)
and LAION-CLAP checkpoint names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clapscale.config import load_config
from clapscale.models import build_model, build_tokenizer, load_model
from clapscale.models.checkpoint import CheckpointMismatchError
from clapscale.models.interop import export_hf, laion_to_clapscale_state


def make_tiny_roberta_dir(root: Path) -> Path:
    """A random tiny RoBERTa + byte-level BPE tokenizer (no RoBERTa vocabulary exists offline)."""
    from transformers import RobertaConfig, RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    merges = ["Ġ t", "h e", "Ġt he", "Ġ s", "o u", "n d"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    RobertaTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root)
    RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=80, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(root)
    return root


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter and BatchNorm statistic, so parity compares non-trivial weights
    (transformers initialises relative position biases to zero and BN statistics to identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return make_tiny_roberta_dir(tmp_path_factory.mktemp("roberta"))


def htsat_roberta(roberta_dir: Path, fusion: str):
    overrides = [
        "model.audio.name=htsat", "model.audio.size=tiny", f"model.audio.fusion={fusion}",
        "model.text.name=roberta", f"model.text.path={roberta_dir}", "model.text.pretrained=false",
    ]
    if fusion != "none":
        overrides += ["audio.length_policy=fusion", "audio.mel_scale=htk"]
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    return cfg, randomize_(build_model(cfg)).eval()


@pytest.mark.parametrize("fusion", ["none", "aff"])
def test_export_to_transformers_and_back_gives_the_same_embeddings(roberta_dir, tmp_path, fusion):
    from transformers import ClapModel as HFClapModel

    from clapscale.models import save_model
    from clapscale.models.cli import export_hf_main, import_hf_main

    cfg, model = htsat_roberta(roberta_dir, fusion)
    save_model(model, cfg, tmp_path / "saved")
    assert export_hf_main([str(tmp_path / "saved"), str(tmp_path / "hf")]) == 0
    hf = HFClapModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()

    channels = 4 if fusion != "none" else 1
    mel = torch.randn(2, channels, 1001, 64)
    is_longer = torch.tensor([fusion != "none", False])
    tok = build_tokenizer(cfg.model.text)(["the sound of rain", "a dog barks and a door shuts"])
    with torch.no_grad():
        ours_a = model.encode_audio(mel, is_longer)
        ours_t = model.encode_text(tok["input_ids"], tok["attention_mask"])
        hf_a = hf.get_audio_features(input_features=mel.clone(), is_longer=is_longer[:, None]).pooler_output
        hf_t = hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    torch.testing.assert_close(ours_a, hf_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours_t, hf_t, atol=2e-5, rtol=1e-4)
    assert hf.logit_scale_a.item() == pytest.approx(model.logit_scale.item())

    assert import_hf_main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    reloaded, cfg2 = load_model(tmp_path / "ours")
    assert (cfg2.model.audio.size, cfg2.model.audio.fusion) == ("tiny", fusion)
    tok2 = build_tokenizer(cfg2.model.text)(["the sound of rain", "a dog barks and a door shuts"])
    assert torch.equal(tok2["input_ids"], tok["input_ids"])
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_audio(mel, is_longer), ours_a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(reloaded.encode_text(**tok2), ours_t, atol=1e-6, rtol=1e-5)


def _to_laion_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> LAION-CLAP's (written independently of the importer, from LAION's module names)."""
    back = [
        ("attention.output.dense.", "attn.proj."), ("attention.self.", "attn."),
        ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
        ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("batch_norm.", "bn0."),
    ]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "logit_scale":
            out["logit_scale_a"] = out["logit_scale_t"] = value
        elif key.startswith(("audio_projection.", "text_projection.")):
            out[key.replace("linear1", "0").replace("linear2", "2")] = value
        elif key.startswith("text_tower.encoder."):
            out["text_branch." + key[len("text_tower.encoder."):]] = value
        else:
            rest = key[len("audio_tower.model.audio_encoder."):]
            for new, old in back:
                rest = rest.replace(new, old)
            for part in ("query", "key", "value"):
                if f"attn.{part}." in rest:
                    qkv.setdefault(rest.replace(f"attn.{part}.", "attn.qkv."), {})[part] = value
                    break
            else:
                out["audio_branch." + rest] = value
    for key, parts in qkv.items():
        out["audio_branch." + key] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    # Tensors LAION checkpoints carry that clapscale does not use.
    out["audio_branch.tscam_conv.weight"] = torch.zeros(527, 768, 2, 3)
    out["audio_branch.head.weight"] = torch.zeros(527, 768)
    out["audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    out["audio_branch.logmel_extractor.melW"] = torch.zeros(1025, 64)
    out["text_transform.sequential.0.weight"] = torch.zeros(512, 512)
    return {"module." + k: v for k, v in out.items()}


def test_laion_clap_names_map_onto_ours(roberta_dir, tmp_path):
    cfg, model = htsat_roberta(roberta_dir, "aff")
    ours = model.state_dict()
    laion = _to_laion_names(ours)
    assert "module.audio_branch.layers.0.blocks.0.attn.qkv.weight" in laion
    assert "module.audio_branch.patch_embed.fusion_model.global_att.1.weight" in laion
    mapped = laion_to_clapscale_state(laion, "htsat")
    assert set(mapped) == set(ours)
    for k, v in ours.items():
        assert torch.equal(mapped[k], v), k
    # The same checkpoint initialises the HTSAT tower through model.audio.pretrained.
    torch.save({"state_dict": laion}, tmp_path / "laion.pt")
    cfg.model.audio.pretrained = str(tmp_path / "laion.pt")
    from clapscale.models import build_audio_tower

    tower = build_audio_tower(cfg.model, cfg.audio)
    for k, v in tower.state_dict().items():
        assert torch.equal(v, ours["audio_tower." + k]), k


def test_laion_clap_cnn_names_map_onto_ours():
    cfg = load_config("configs/tiny.yaml")
    ours = build_model(cfg).state_dict()
    laion = {}
    for key, value in ours.items():
        if key == "logit_scale":
            laion["logit_scale_a"] = laion["logit_scale_t"] = value
        elif key.startswith(("audio_projection.", "text_projection.")):
            laion[key.replace("linear1", "0").replace("linear2", "2")] = value
        elif key.startswith("text_tower.encoder."):
            laion["text_branch." + key[len("text_tower.encoder."):]] = value
        else:
            laion["audio_branch." + key[len("audio_tower."):]] = value
    laion["audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    laion["audio_branch.logmel_extractor.melW"] = torch.zeros(1025, 64)
    laion["audio_branch.fc_audioset.weight"] = torch.zeros(527, 128)
    mapped = laion_to_clapscale_state({"module." + k: v for k, v in laion.items()}, "cnn")
    assert set(mapped) == set(ours)
    assert all(torch.equal(mapped[k], v) for k, v in ours.items())


def _one_line_error(capsys, prog: str) -> str:
    """The stderr of a command that failed on a user error: one line ``prog: error: ...``, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


def test_export_refuses_other_towers(tmp_path, capsys):
    from clapscale.cli import main as cli_main
    from clapscale.errors import EXIT_USER_ERROR
    from clapscale.models import save_model

    cfg = load_config("configs/tiny.yaml")
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"model\.audio\.name='cnn'.*model\.text\.name='minilm'"):
        export_hf(model, cfg, tmp_path / "hf")
    save_model(model, cfg, tmp_path / "saved")
    # User errors exit 2 with one line, as every clapscale command does (clapscale/errors.py).
    assert cli_main(["export-hf", str(tmp_path / "saved"), str(tmp_path / "hf")]) == EXIT_USER_ERROR
    assert "transformers' ClapModel holds HTSAT only" in _one_line_error(capsys, "clapscale export-hf")
    assert cli_main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == EXIT_USER_ERROR
    assert "missing" in _one_line_error(capsys, "clapscale import-hf")


def test_htsat_checkpoint_of_another_size_is_refused(tmp_path):
    from safetensors.torch import save_file

    from clapscale.models import build_audio_tower
    from clapscale.models.audio.htsat import build_htsat

    state = {"audio_model." + k: v.contiguous() for k, v in build_htsat("tiny").model.state_dict().items()}
    # HTSAT-base's patch embedding is 128 wide where tiny's is 96.
    state["audio_model.audio_encoder.patch_embed.proj.weight"] = torch.zeros(128, 1, 4, 4)
    save_file(state, str(tmp_path / "b.safetensors"))
    cfg = load_config(
        "configs/tiny.yaml", ["model.audio.name=htsat", f"model.audio.pretrained={tmp_path / 'b.safetensors'}"]
    )
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed\.proj\.weight: checkpoint \(128, 1, 4, 4\)"):
        build_audio_tower(cfg.model, cfg.audio)


def _hf_to_laion_checkpoint(hf_state: dict[str, torch.Tensor], layout: str) -> dict:
    """A transformers ClapModel's weights in the layout LAION released: ``text_branch.*`` with the
    ``embeddings.position_ids`` older transformers saved, ``*_projection.{0,2}``, both temperatures,
    the unused heads; nested as a training checkpoint with ``module.`` prefixes, or bare."""
    ours_names: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if key.startswith("audio_model."):
            ours_names["audio_tower.model." + key[len("audio_model."):]] = value
        elif key.startswith("text_model."):
            if key.endswith(("position_ids", "token_type_ids")):
                continue
            ours_names["text_tower.encoder." + key[len("text_model."):]] = value
        elif key == "logit_scale_a":
            ours_names["logit_scale"] = value
        elif key != "logit_scale_t":
            ours_names[key] = value
    laion = _to_laion_names(ours_names)  # "module." + LAION names
    laion["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]
    if layout == "training":
        return {"epoch": 45, "state_dict": laion, "optimizer": {"state": {}, "param_groups": []}}
    return {k.removeprefix("module."): v for k, v in laion.items()}


@pytest.mark.parametrize("fusion,layout", [("none", "training"), ("aff", "bare")])
def test_import_laion_checkpoint_matches_transformers(roberta_dir, tmp_path, fusion, layout):
    """`clapscale import-laion` on a whole laion_clap checkpoint built from a random transformers
    ClapModel: the imported model, loaded through clapscale.inference, embeds audio and text as
    transformers' ClapModel does with the same weights, with the same temperature."""
    from transformers import ClapModel as HFClapModel

    import clapscale.inference as ci
    from clapscale.cli import main as cli_main
    from clapscale.models.interop import hf_clap_config

    cfg, model = htsat_roberta(roberta_dir, fusion)
    torch.manual_seed(1)
    hf = randomize_(HFClapModel(hf_clap_config(model, cfg)), seed=1).eval()
    with torch.no_grad():
        hf.logit_scale_a.fill_(3.3)
        hf.logit_scale_t.fill_(3.3)
    torch.save(_hf_to_laion_checkpoint(hf.state_dict(), layout), tmp_path / "laion.pt")

    assert cli_main(["import-laion", str(tmp_path / "laion.pt"), str(tmp_path / "ours"), "--text", str(roberta_dir)]) == 0
    clap = ci.load(tmp_path / "ours", device="cpu")
    assert (clap.cfg.model.audio.size, clap.cfg.model.audio.fusion) == ("tiny", fusion)
    assert clap.cfg.audio.mel_scale == ("htk" if fusion == "aff" else "slaney")

    mel = torch.randn(2, 4 if fusion == "aff" else 1, 1001, 64)
    is_longer = torch.tensor([fusion == "aff", False])
    texts = ["the sound of rain", "a dog barks and a door shuts"]
    tok = clap.tokenizer(texts)
    ref_tok = build_tokenizer(cfg.model.text)(texts)  # the tokenizer of --text
    assert torch.equal(tok["input_ids"], ref_tok["input_ids"])
    with torch.no_grad():
        got_a = clap.model.encode_audio(mel, is_longer)
        got_t = clap.model.encode_text(tok["input_ids"], tok["attention_mask"])
        ref_a = hf.get_audio_features(input_features=mel.clone(), is_longer=is_longer[:, None]).pooler_output
        ref_t = hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    torch.testing.assert_close(got_a, ref_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_t, ref_t, atol=2e-5, rtol=1e-4)
    assert clap.model.logit_scale.item() == pytest.approx(3.3)


def test_import_laion_refuses_what_it_cannot_import(roberta_dir, tmp_path, capsys):
    from clapscale.cli import main as cli_main
    from clapscale.errors import EXIT_USER_ERROR

    def import_laion(*argv: str) -> str:
        """Run `clapscale import-laion`; it must fail as a user error (exit 2, one line): its message."""
        assert cli_main(["import-laion", *argv]) == EXIT_USER_ERROR
        return _one_line_error(capsys, "clapscale import-laion")

    cfg, model = htsat_roberta(roberta_dir, "none")
    good = _to_laion_names(model.state_dict())
    args = ["--text", str(roberta_dir)]
    # Not a laion_clap checkpoint: only an audio tower.
    torch.save({k: v for k, v in good.items() if "text_branch" not in k}, tmp_path / "audio.pt")
    assert "not a laion_clap checkpoint (no text_branch.* tensors" in import_laion(str(tmp_path / "audio.pt"),
                                                                                  str(tmp_path / "o1"), *args)
    # A text directory of another size than the checkpoint's text branch: the tensor is named.
    other = make_tiny_roberta_dir(tmp_path / "wide")
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "intermediate_size": 48}))
    torch.save({"state_dict": good}, tmp_path / "laion.pt")
    assert ("text_tower.encoder.encoder.layer.0.intermediate.dense.weight: checkpoint (64, 32)"
            in import_laion(str(tmp_path / "laion.pt"), str(tmp_path / "o2"), "--text", str(other)))
    # A --text directory without a config.json, a pickle that is not a state dict, a file that is not a
    # checkpoint, a missing file.
    assert "no readable config.json" in import_laion(str(tmp_path / "laion.pt"), str(tmp_path / "o5"),
                                                     "--text", str(tmp_path))
    torch.save([1, 2], tmp_path / "list.pt")
    assert "list.pt: not a readable torch checkpoint" in import_laion(str(tmp_path / "list.pt"), str(tmp_path / "o6"), *args)
    (tmp_path / "junk.pt").write_bytes(b"<html>404 Not Found</html>")  # a failed download
    assert "junk.pt: not a readable torch checkpoint" in import_laion(str(tmp_path / "junk.pt"), str(tmp_path / "o3"), *args)
    assert "checkpoint file not found" in import_laion(str(tmp_path / "none.pt"), str(tmp_path / "o4"), *args)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6"))
