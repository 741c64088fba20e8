"""A CLIP ViT-B/32 checkpoint as open_clip writes it is the pivot of VIP-ANT / AudioCLIP: one file
given as ``model.image.path`` and ``model.text.path`` makes our image and text towers compute exactly
what open_clip computes after loading the same file with its own loader (``create_model(...,
pretrained=FILE)``). No weights can be downloaded here, so the checkpoint holds a random
initialisation; the format, the key mapping, the tokenizer and the forward passes are the real ones."""

import pytest
import torch
import torch.nn.functional as F

from clapscale.config import load_config
from clapscale.models import build_model, build_tokenizer


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    with torch.no_grad():  # move the norms off their init values, so a missed layer norm shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("clip") / "open_clip_vit_b32.pt"
    torch.save({"epoch": 32, "name": "ViT-B-32", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)  # open_clip's training checkpoint layout (DDP prefix, under state_dict)
    return path


def test_an_open_clip_vit_b32_checkpoint_gives_open_clips_image_and_text_embeddings(clip_file):
    import open_clip

    reference = open_clip.create_model("ViT-B-32", pretrained=str(clip_file)).eval()
    cfg = load_config("configs/tiny.yaml", [
        "model.image.name=clip", "model.image.size=b32", f"model.image.path={clip_file}", "model.image.frozen=true",
        "model.text.name=clip", f"model.text.path={clip_file}", "model.text.pretrained=true", "model.text.frozen=true",
        "model.pivot=true", "model.embed_dim=512", "data.image_size=224", "loss.kind=pairwise",
        "loss.weight_audio_text=0", "loss.weight_audio_image=1", "loss.weight_image_text=1",
    ])
    model = build_model(cfg).eval()
    texts = ["a dog barks twice", "rain on a tin roof", "a sword hits a shield"]
    tok = build_tokenizer(cfg.model.text)(texts)
    assert torch.equal(tok["input_ids"], open_clip.get_tokenizer("ViT-B-32")(texts))
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(images), model.encode_text(**tok)
        ref_image = F.normalize(reference.encode_image(images), dim=-1)
        ref_text = F.normalize(reference.encode_text(tok["input_ids"]), dim=-1)
    torch.testing.assert_close(ours_image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_text, ref_text, atol=1e-5, rtol=0)
    # The pivot keeps CLIP's own space: image-text similarities are open_clip's.
    torch.testing.assert_close(ours_image @ ours_text.T, ref_image @ ref_text.T, atol=1e-5, rtol=0)
