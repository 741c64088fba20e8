"""Reading state dicts safely and checking them against a model before loading."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clapscale.errors import UserError


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's tensors do not match the model built from the config (names or shapes)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True``.

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (LAION / open_clip / PANNs
    checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Raise ``CheckpointMismatchError`` naming every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(own)) if strict else []
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                shown = "; ".join(items[:10]) + (f"; ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointMismatchError(
            f"{where} does not fit the model built from its config (another architecture or size?). "
            + " | ".join(parts)
        )


CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TEXT_DIR = "text"


def save_model(model: nn.Module, cfg, directory: str | Path) -> Path:
    """Write the consolidated fp32 inference format to ``directory``.

    ``config.yaml`` (the full ``Config``), ``model.safetensors`` (fp32 weights + buffers) and, for
    transformers text towers, ``text/`` (their config.json + tokenizer files) so the directory is
    self-contained offline. Files are written under temporary names and renamed when complete.
    """
    import os

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    text_tower = getattr(model, "text_tower", None)
    encoder = getattr(text_tower, "encoder", None)
    if encoder is not None:
        from clapscale.models.factory import build_tokenizer

        text_dir = directory / TEXT_DIR
        encoder.config.save_pretrained(text_dir)
        build_tokenizer(cfg.model.text).hf_tokenizer.save_pretrained(text_dir)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "clapscale"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_model(directory: str | Path, map_location: str | torch.device = "cpu"):
    """Read a directory written by :func:`save_model` -> ``(ClapModel, Config)``.

    The returned config rebuilds this architecture offline: ``model.text.path`` points at the bundled
    ``text/`` directory (when there is one), ``model.text.pretrained`` is false and
    ``model.audio.pretrained`` empty, since the weights come from ``model.safetensors``. Tensors that
    do not fit (another architecture, other sizes) raise ``CheckpointMismatchError`` naming them.
    """
    import yaml
    from safetensors.torch import load_file

    from clapscale.config import config_from_dict
    from clapscale.models.factory import build_model

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a clapscale model directory: no {name}")
    cfg = config_from_dict(yaml.safe_load((directory / CONFIG_FILE).read_text()) or {})
    cfg.model.audio.pretrained = ""
    cfg.model.text.pretrained = False
    if (directory / TEXT_DIR).is_dir():
        cfg.model.text.path = str(directory / TEXT_DIR)
    model = build_model(cfg)
    state = load_file(str(directory / WEIGHTS_FILE))
    check_shapes(model, state, where=str(directory / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    return model.to(map_location), cfg
