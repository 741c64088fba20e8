"""Load a trained model from whatever a run left behind: the one place that resolves checkpoint paths.

``load_trained_model(path) -> (ClapModel, Config)`` accepts
  - an exported directory (``config.yaml`` + ``model.safetensors``): the trainer's ``runs/<name>/model``,
    ``save_model``'s output or ``clapscale import-hf``'s;
  - a trainer checkpoint directory ``.../checkpoints/step_XXXXXXXX`` (any ZeRO stage; stage 3
    partitions are consolidated with DeepSpeed's fp32 reader);
  - a run directory (``runs/<name>``): its export ``model/`` if training finished, else its newest
    complete checkpoint.

Both the inference API and ``clapscale eval`` build on it. A path that is none of these, or a file
that is damaged (a cut download, a config edited by hand), raises ``ModelLoadError`` naming the file
and what to do, never a deserializer's traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from clapscale.config import Config, ConfigError, config_from_dict
from clapscale.errors import UserError
from clapscale.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_shapes, load_model


class ModelLoadError(UserError, ValueError):
    """A model path is not a model, or one of its files is damaged; the message names the file."""


def load_trained_model(path: str | Path) -> tuple[nn.Module, Config]:
    """``path`` (exported dir, trainer checkpoint dir or run dir) -> ``(ClapModel, Config)`` on CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / WEIGHTS_FILE).is_file():
        return _load_export(path)
    if (path / "model" / WEIGHTS_FILE).is_file():  # a run directory with its final export
        return _load_export(path / "model")
    if (path / "checkpoints").is_dir():
        steps = sorted(p for p in (path / "checkpoints").glob("step_*") if p.is_dir() and (p / "meta.json").is_file())
        if not steps:
            raise ModelLoadError(f"{path} is a run directory with no complete checkpoint under {path / 'checkpoints'}")
        path = steps[-1]
    if (path / "mp_rank_00_model_states.pt").is_file() or any(path.glob("zero_pp_rank_*_model_states.pt")):
        return _load_trainer_checkpoint(path)
    raise ModelLoadError(
        f"{path} is neither an exported model (config.yaml + model.safetensors) nor a trainer checkpoint "
        "(config.yaml + mp_rank_00_model_states.pt) nor a run directory with checkpoints/"
    )


def _damaged(file: Path, exc: BaseException, what_to_do: str) -> ModelLoadError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{file} is damaged or not what it claims to be ({detail}): {what_to_do}")


def _read_config(file: Path) -> Config:
    import yaml

    if not file.is_file():
        raise ModelLoadError(f"{file.parent} has no {file.name}: copy the whole model directory")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _damaged(file, e, "restore it from the run (runs/<name>/model/config.yaml)") from e
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ModelLoadError(f"{file}: {e}") from e


def _load_export(directory: Path) -> tuple[nn.Module, Config]:
    from safetensors import SafetensorError

    _read_config(directory / CONFIG_FILE)  # names a damaged config before anything is built
    try:
        return load_model(directory)
    except SafetensorError as e:
        raise _damaged(directory / WEIGHTS_FILE, e, "copy or export it again") from e


def _consolidate_fp32(path: Path) -> dict[str, Tensor]:
    """fp32 master weights of a ZeRO checkpoint, gathered from every rank's partition by DeepSpeed's reader.

    That reader unpickles the files with ``weights_only=False``: load only checkpoints you trust
    (the run's exported ``model/`` directory has no such caveat).
    """
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ModelLoadError(
            f"{path} is a ZeRO-3 checkpoint; consolidating its partitions needs deepspeed ({e}); "
            "or use the run's exported model directory (runs/<name>/model)"
        ) from e
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))


def _load_trainer_checkpoint(path: Path) -> tuple[nn.Module, Config]:
    from clapscale.models import build_model

    cfg = _read_config(path / CONFIG_FILE)
    states_file = path / "mp_rank_00_model_states.pt"
    sd = None
    if states_file.is_file():
        try:
            states = torch.load(states_file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as e:  # torch's zip / pickle readers
            raise _damaged(states_file, e, "resume from or load an earlier checkpoint") from e
        sd = states.get("module") if isinstance(states, dict) else None
    if not sd or any(t.numel() == 0 for t in sd.values() if isinstance(t, Tensor)):
        # ZeRO-3: the weights exist only as fp32 partitions in the ranks' optimizer files.
        sd = _consolidate_fp32(path)
    elif cfg.train.precision != "fp32":
        # The module copy is bf16/fp16; the fp32 master weights (what the export holds) sit in the
        # optimizer partitions.
        try:
            sd = _consolidate_fp32(path)
        except Exception as e:  # noqa: BLE001 - any reader failure: say so and use the 16-bit copy
            warnings.warn(
                f"{path}: could not read the fp32 master weights ({type(e).__name__}: {e}); using the "
                f"{cfg.train.precision} module copy, rounded to {cfg.train.precision}",
                stacklevel=2,
            )
    # The weights come from the checkpoint: build the towers without loading pretrained ones.
    cfg.model.audio.pretrained = ""
    cfg.model.text.pretrained = False
    model = build_model(cfg)
    own = model.state_dict()
    # DeepSpeed stores 0-d parameters (the temperature) as shape (1,); give tensors the model's shape back.
    sd = {
        k: (v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v).float()
        if v.is_floating_point() else v
        for k, v in sd.items()
    }
    check_shapes(model, sd, where=str(path))
    model.load_state_dict(sd, strict=True)
    return model, cfg


def init_weights_from(model: nn.Module, path: str | Path) -> Config:
    """Copy the weights of the trained model at ``path`` into ``model`` (in place); returns its config.

    ``path`` is anything :func:`load_trained_model` reads. Every tensor must match by name and shape
    (``CheckpointMismatchError`` names the ones that do not: another tower, size or ``embed_dim``).
    """
    if not Path(path).exists():
        raise ModelLoadError(
            f"train.init_from={str(path)!r} does not exist: give an exported model directory "
            "(runs/<name>/model), a trainer checkpoint (runs/<name>/checkpoints/step_N) or a run directory"
        )
    source, source_cfg = load_trained_model(path)
    state = source.state_dict()
    check_shapes(model, state, where=f"train.init_from={str(path)!r}")
    model.load_state_dict(state, strict=True)
    return source_cfg

