"""Speed switches prepared for the GPU (benchmarks/gpu_suite.sh measures their effect): each gives
the outputs of the path it replaces, within float tolerance, on the CPU."""

from __future__ import annotations

import pytest
import torch

from clapscale.config import AudioConfig, ConfigError, ModelConfig, load_config
from clapscale.models.audio.htsat import SdpaWindowAttention, build_htsat
from clapscale.models.factory import build_audio_tower
from clapscale.train.engine import apply_speed_settings


def _mel(batch: int, frames: int = 1001) -> torch.Tensor:
    return torch.randn(batch, 1, frames, 64, generator=torch.Generator().manual_seed(0))


def test_htsat_sdpa_window_attention_matches_eager_forward_and_backward():
    """Shifted windows included (every second block of each stage carries the shift mask)."""
    torch.manual_seed(0)
    tower = build_htsat("tiny").eval()  # eval: drop_path off, so both passes see the same network
    mel = _mel(2)  # two clips: a wrong clip / window order in the shift mask's expand would show

    def run():
        tower.zero_grad()
        out = tower(mel)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in tower.named_parameters()
                 if "relative_position_bias" in n or "query" in n}
        return out.detach(), grads

    ref, ref_grads = run()
    tower.set_attention("sdpa")
    assert sum(isinstance(m, SdpaWindowAttention) for m in tower.modules()) == 12  # depths 2+2+6+2
    got, got_grads = run()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    tower.set_attention("eager")
    assert not any(isinstance(m, SdpaWindowAttention) for m in tower.modules())
    torch.testing.assert_close(tower(mel), ref, atol=0, rtol=0)


def test_attention_and_channels_last_are_config_fields_with_clear_errors():
    audio = AudioConfig()
    cfg = load_config(None, ["model.audio.attention=sdpa"])
    tower = build_audio_tower(cfg.model, audio)
    assert any(isinstance(m, SdpaWindowAttention) for m in tower.modules())
    with pytest.raises(ConfigError, match="model.audio.attention"):
        load_config(None, ["model.audio.attention=flash"])
    with pytest.raises(ConfigError, match="applies to HTSAT"):
        build_audio_tower(load_config(None, ["model.audio.name=cnn", "model.audio.size=tiny",
                                             "model.audio.attention=sdpa"]).model, audio)
    with pytest.raises(ConfigError, match="channels_last=true applies to the CNN towers"):
        build_audio_tower(load_config(None, ["model.audio.channels_last=true"]).model, audio)
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=fast"])


def test_cnn_channels_last_matches_contiguous():
    audio = AudioConfig()
    model_cfg = ModelConfig()
    model_cfg.audio.name, model_cfg.audio.size = "cnn", "tiny"
    torch.manual_seed(0)
    ref_tower = build_audio_tower(model_cfg, audio).eval()
    model_cfg.audio.channels_last = True
    tower = build_audio_tower(model_cfg, audio).eval()
    tower.load_state_dict(ref_tower.state_dict())
    seen = []
    tower.conv_block1.conv2.register_forward_hook(lambda m, i, o: seen.append(o))
    mel = _mel(3)
    torch.testing.assert_close(tower(mel), ref_tower(mel), atol=1e-5, rtol=1e-5)
    # The convolutions run in NHWC; the weights stay contiguous (DeepSpeed flattens them by storage).
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in tower.parameters())


def test_compile_switch_compiles_towers_in_place_with_the_same_outputs():
    """aot_eager traces and runs through torch.compile's machinery without generating kernels (the
    GPU suite measures inductor); parameter names stay, so checkpoints load either way."""
    cfg = load_config(None, ["model.audio.name=cnn", "model.audio.size=tiny", "train.compile=aot_eager",
                             "train.tf32=true"])
    torch.manual_seed(0)
    tower = build_audio_tower(cfg.model, AudioConfig()).eval()
    mel = _mel(2)
    ref = tower(mel)
    keys = list(tower.state_dict())

    class Pair(torch.nn.Module):  # the two attributes apply_speed_settings compiles
        def __init__(self):
            super().__init__()
            self.audio_tower, self.text_tower = tower, torch.nn.Linear(4, 4)

    before = torch.get_float32_matmul_precision()
    apply_speed_settings(Pair(), cfg, torch.device("cpu"))
    assert tower._compiled_call_impl is not None
    assert torch.get_float32_matmul_precision() == before  # TF32 is CUDA-only: CPU stays exact
    assert list(tower.state_dict()) == keys
    torch.testing.assert_close(tower(mel), ref, atol=1e-5, rtol=1e-5)


def test_every_gpu_suite_variant_is_a_valid_config_of_its_recipe():
    """benchmarks/gpu_suite.sh measures RECIPE+VARIANT names on the GPU: a misspelt field there would
    only show as a failed row in a short GPU lease. Loaded here through bench_train's own parser."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_train", repo / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_train", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    names = re.search(r'VARIANTS="([^"]+)"', (repo / "benchmarks" / "gpu_suite.sh").read_text()).group(1).split(",")
    assert {v for n in names for v in n.split("+")[1:]} == set(bench.VARIANTS)  # each switch measured
    for name in names:
        recipe = bench.recipe_of(name)
        cfg = load_config(repo / "configs" / recipe.config, list(recipe.overrides))  # validates every field
        if "sdpa" in name:
            assert cfg.model.audio.attention == "sdpa" and cfg.model.audio.name == "htsat"
        if "channels_last" in name:
            assert cfg.model.audio.channels_last and cfg.model.audio.name == "cnn"
    assert bench.recipe_of("htsat-base-roberta+bogus") is None
