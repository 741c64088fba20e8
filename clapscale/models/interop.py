"""Checkpoint interop: transformers ``ClapModel`` directories and LAION-CLAP state dicts.

Name maps (ours <-> transformers ``ClapModel``), prefix renames only because our HTSAT holds a real
``ClapAudioModel`` and our RoBERTa a ``RobertaModel`` with the same layout as ``ClapTextModel``:

=============================  ==============================
clapscale                      transformers ClapModel
=============================  ==============================
audio_tower.model.*            audio_model.*
text_tower.encoder.*           text_model.*
audio_projection.linear{1,2}   audio_projection.linear{1,2}
text_projection.linear{1,2}    text_projection.linear{1,2}
logit_scale                    logit_scale_a and logit_scale_t
=============================  ==============================

LAION-CLAP (``audio_branch.*``, ``text_branch.*``, ``*_projection.{0,2}``, fused ``attn.qkv``) is
renamed to the transformers names first (the renaming transformers' own conversion script
applies), then as above. LAION's unused heads (``tscam_conv``, ``head``, ``*_transform``) and its
STFT / mel buffers are dropped. transformers' ``ClapModel`` has one temperature per direction;
clapscale has one, so import takes ``logit_scale_a`` (LAION trains them equal) and export writes both.

``import_laion`` (``clapscale import-laion``) turns a whole laion_clap ``.pt`` into a clapscale model
directory: the HTSAT size and fusion are read from the tensors, the text tower's config and tokenizer
come from a directory the user gives (a checkpoint holds weights only).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import torch

from clapscale.config import Config
from clapscale.errors import UserError
from clapscale.models.checkpoint import CheckpointMismatchError, check_shapes, read_state_dict

class InteropError(UserError, ValueError):
    """A model, directory or checkpoint given to export-hf / import-hf / import-laion that cannot be
    converted (another architecture, missing files beside it); the message names it."""


_OURS_TO_HF = (("audio_tower.model.", "audio_model."), ("text_tower.encoder.", "text_model."))


def clapscale_to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``ClapModel`` state dict (HTSAT + RoBERTa) -> transformers ``ClapModel`` names."""
    out = {}
    for key, value in state.items():
        if key == "logit_scale":
            out["logit_scale_a"] = value
            out["logit_scale_t"] = value.clone()
            continue
        for ours, hf in _OURS_TO_HF:
            if key.startswith(ours):
                key = hf + key[len(ours):]
                break
        out[key] = value
    return out


def hf_to_clapscale_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``ClapModel`` names -> ours (``logit_scale_a`` becomes ``logit_scale``)."""
    out = {}
    for key, value in state.items():
        if key == "logit_scale_a":
            out["logit_scale"] = value
            continue
        if key == "logit_scale_t":
            continue
        for ours, hf in _OURS_TO_HF:
            if key.startswith(hf):
                key = ours + key[len(hf):]
                break
        out[key] = value
    return out


# LAION-CLAP HTSAT -> transformers HTSAT substring renames, applied in order.
_LAION_HTSAT_RENAMES = (
    ("attn.", "attention.self."),
    ("attention.self.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("bn0.", "batch_norm."),
)
_LAION_DROP = re.compile(
    r"^(text_transform|audio_transform)\.|^audio_branch\.(spectrogram_extractor|logmel_extractor|"
    r"tscam_conv|head|fc_audioset)\.|attn_mask$"
    # Index buffers older transformers saved with the text tower (laion_clap's own loader deletes
    # position_ids); they hold arange() values, not weights.
    r"|^text_branch\.embeddings\.(position_ids|token_type_ids)$"
)


def laion_to_clapscale_state(state: dict[str, torch.Tensor], audio_tower: str) -> dict[str, torch.Tensor]:
    """A LAION-CLAP checkpoint's state dict -> our names.

    ``audio_tower`` is our registry name: ``htsat`` (renamed to transformers' HTSAT layout, fused qkv
    split into query / key / value) or ``cnn`` (PANNs names are ours already). Text towers
    (``text_branch.*``: RoBERTa / BERT from transformers) keep their names under ``text_tower.encoder``.
    """
    if audio_tower not in ("htsat", "cnn"):
        raise ValueError(f"LAION names for audio tower {audio_tower!r} are not mapped (htsat and cnn are)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _LAION_DROP.search(key):
            continue
        m = re.fullmatch(r"(audio|text)_projection\.(\d+)\.(weight|bias)", key)
        if m:
            out[f"{m[1]}_projection.linear{1 if m[2] == '0' else 2}.{m[3]}"] = value
        elif key == "logit_scale_a":
            out["logit_scale"] = value
        elif key == "logit_scale_t":
            continue
        elif key.startswith("text_branch."):
            out["text_tower.encoder." + key[len("text_branch."):]] = value
        elif key.startswith("audio_branch.") and audio_tower == "cnn":
            out["audio_tower." + key[len("audio_branch."):]] = value
        elif key.startswith("audio_branch."):
            rest = key[len("audio_branch."):]
            for old, new in _LAION_HTSAT_RENAMES:
                rest = rest.replace(old, new)
            rest = "audio_tower.model.audio_encoder." + rest
            if ".attention.self.qkv." in rest:
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[rest.replace(".qkv.", f".{name}.")] = part.clone()
            else:
                out[rest] = value
        else:
            raise CheckpointMismatchError(f"LAION-CLAP checkpoint: tensor {key!r} has no clapscale name")
    return out


# --------------------------------------------------------------------------------------------
# Loading tower weights (model.audio.pretrained for HTSAT)
# --------------------------------------------------------------------------------------------


def load_htsat_weights(tower, path: str) -> None:
    """Initialise an HTSAT tower from a transformers ``ClapModel`` / ``ClapAudioModel`` directory or
    weights file, or a LAION-CLAP checkpoint. Fusion modules absent from an unfused checkpoint keep
    their init; any other mismatch raises ``CheckpointMismatchError`` naming tensors."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"model.audio.pretrained={path!r}: no weights file in the directory")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_state_dict(f))
    else:
        state = read_state_dict(p)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("audio_branch.") for k in state):
        ours = laion_to_clapscale_state(state, "htsat")
        prefix = "audio_tower.model."
    elif any(k.startswith("audio_model.") for k in state):
        ours = hf_to_clapscale_state(state)
        prefix = "audio_tower.model."
    elif any(k.startswith("audio_encoder.") for k in state):  # a bare ClapAudioModel
        ours = {"audio_tower.model." + k: v for k, v in state.items()}
        prefix = "audio_tower.model."
    else:
        raise CheckpointMismatchError(
            f"model.audio.pretrained={path!r} holds no HTSAT weights (no audio_branch.*, audio_model.* "
            "or audio_encoder.* tensors)"
        )
    sub = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
    check_shapes(tower.model, sub, where=f"model.audio.pretrained={path!r}", strict=False)
    own = tower.model.state_dict()
    fresh = ("audio_encoder.patch_embed.mel_conv2d.", "audio_encoder.patch_embed.fusion_model.")
    missing = sorted(k for k in own if k not in sub and not k.startswith(fresh))
    unexpected = sorted(set(sub) - set(own))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"model.audio.pretrained={path!r} does not fit HTSAT-{tower_size(tower)}: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    tower.model.load_state_dict(sub, strict=False)


def tower_size(tower) -> str:
    from clapscale.models.audio.htsat import HTSAT_SIZES

    c = tower.model.config
    for name, dims in HTSAT_SIZES.items():
        if dims["patch_embeds_hidden_size"] == c.patch_embeds_hidden_size and list(dims["depths"]) == list(c.depths):
            return name
    return f"custom(embed {c.patch_embeds_hidden_size}, depths {list(c.depths)})"


# --------------------------------------------------------------------------------------------
# transformers ClapModel directories
# --------------------------------------------------------------------------------------------


def _check_exportable(model, cfg: Config) -> None:
    a, t = cfg.model.audio, cfg.model.text
    problems = []
    if a.name != "htsat":
        problems.append(f"model.audio.name={a.name!r} (transformers' ClapModel holds HTSAT only)")
    if a.fusion not in ("none", "aff"):
        problems.append(f"model.audio.fusion={a.fusion!r} (transformers implements AFF only)")
    if t.name != "roberta":
        problems.append(f"model.text.name={t.name!r} (transformers' ClapTextModel is RoBERTa)")
    if problems:
        raise InteropError("cannot export to a transformers ClapModel: " + "; ".join(problems))


def hf_clap_config(model, cfg: Config):
    """The ``ClapConfig`` describing our HTSAT + RoBERTa model."""
    from transformers import ClapConfig

    _check_exportable(model, cfg)
    rc = model.text_tower.encoder.config
    text_keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
        "eos_token_id",
    )
    text_config = {k: getattr(rc, k) for k in text_keys}
    audio_config = model.audio_tower.model.config.to_dict()
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        audio_config.pop(k, None)
    return ClapConfig(
        text_config=text_config,
        audio_config=audio_config,
        projection_dim=cfg.model.embed_dim,
        logit_scale_init_value=cfg.model.init_logit_scale,
    )


def to_hf_clap(model, cfg: Config):
    """Our HTSAT + RoBERTa ``ClapModel`` -> a transformers ``ClapModel`` with the same weights (eval mode)."""
    from transformers import ClapModel as HFClapModel

    hf = HFClapModel(hf_clap_config(model, cfg))
    state = clapscale_to_hf_state(model.state_dict())
    own = hf.state_dict()
    buffers = {n for n, _ in hf.named_buffers()}
    missing = sorted(k for k in own if k not in state and k not in buffers)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"export to transformers ClapModel: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    check_shapes(hf, state, where="export to transformers ClapModel", strict=False)
    hf.load_state_dict(state, strict=False)
    return hf.eval()


def export_hf(model, cfg: Config, directory: str | Path) -> Path:
    """Write a transformers ``ClapModel`` directory (``save_pretrained`` layout, loadable with
    ``ClapModel.from_pretrained``) plus the tokenizer and a ``ClapFeatureExtractor`` config."""
    from transformers import ClapFeatureExtractor

    from clapscale.models.factory import build_tokenizer

    directory = Path(directory)
    fused = cfg.model.audio.fusion != "none"
    if (cfg.audio.mel_scale == "htk") != fused:
        # ClapFeatureExtractor ties the mel definition to the truncation mode: HTK for "fusion",
        # Slaney otherwise. Another pairing exports fine but its processor computes other mels.
        warnings.warn(
            f"audio.mel_scale={cfg.audio.mel_scale!r} with model.audio.fusion={cfg.model.audio.fusion!r}: "
            "transformers' ClapFeatureExtractor will compute "
            f"{'HTK' if fused else 'Slaney'} mels for this model, not the ones it was trained on; "
            "feed it clapscale's front end (clapscale.features) instead of ClapProcessor",
            stacklevel=2,
        )
    hf = to_hf_clap(model, cfg)
    hf.save_pretrained(directory)
    build_tokenizer(cfg.model.text).hf_tokenizer.save_pretrained(directory)
    a = cfg.audio
    ClapFeatureExtractor(
        feature_size=a.n_mels,
        sampling_rate=a.sample_rate,
        hop_length=a.hop_length,
        max_length_s=int(a.clip_seconds),
        fft_window_size=a.n_fft,
        frequency_min=a.f_min,
        frequency_max=a.f_max,
        truncation="fusion" if cfg.model.audio.fusion != "none" else "rand_trunc",
        padding="repeatpad",
    ).save_pretrained(directory)
    return directory


def import_hf(src: str | Path, dst: str | Path):
    """Read a transformers ``ClapModel`` directory, write a clapscale model directory at ``dst``
    (``save_model`` format) and return ``(ClapModel, Config)``."""
    from transformers import AutoTokenizer, ClapModel as HFClapModel, RobertaConfig

    from clapscale.config import config_from_dict
    from clapscale.models.audio.htsat import HTSAT_SIZES
    from clapscale.models.checkpoint import TEXT_DIR, save_model
    from clapscale.models.factory import build_model

    src, dst = Path(src), Path(dst)
    try:
        hf = HFClapModel.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InteropError(f"{src}: not a transformers ClapModel directory ({e})") from e
    ac, tc = hf.config.audio_config, hf.config.text_config
    size = next(
        (n for n, d in HTSAT_SIZES.items()
         if d["patch_embeds_hidden_size"] == ac.patch_embeds_hidden_size and list(d["depths"]) == list(ac.depths)),
        None,
    )
    if size is None:
        raise InteropError(
            f"{src}: HTSAT with embed {ac.patch_embeds_hidden_size} and depths {list(ac.depths)} is none of "
            f"the sizes {', '.join(HTSAT_SIZES)}"
        )
    fused = bool(ac.enable_fusion)
    if fused and ac.fusion_type not in (None, "aff_2d"):
        raise InteropError(f"{src}: fusion_type={ac.fusion_type!r} is not supported (aff_2d is)")
    text_dir = dst / TEXT_DIR
    text_dir.mkdir(parents=True, exist_ok=True)
    rc = RobertaConfig(**{k: v for k, v in tc.to_dict().items() if k not in ("model_type", "architectures", "transformers_version", "projection_dim", "projection_hidden_act")})
    rc.save_pretrained(text_dir)
    try:
        AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(text_dir)
    except (OSError, ValueError) as e:
        raise InteropError(f"{src}: no tokenizer files beside the weights ({e}); copy the RoBERTa tokenizer there") from e
    raw = {
        "audio": {
            "n_mels": int(ac.num_mel_bins),
            # LAION's fused models use HTK mels without norm, its unfused ones Slaney (DESIGN.md).
            "mel_scale": "htk" if fused else "slaney",
            "length_policy": "fusion" if fused else "rand_trunc",
        },
        "model": {
            "audio": {"name": "htsat", "size": size, "fusion": "aff" if fused else "none"},
            "text": {"name": "roberta", "path": str(text_dir), "pretrained": False},
            "embed_dim": int(hf.config.projection_dim),
        },
    }
    cfg = config_from_dict(copy.deepcopy(raw))
    model = build_model(cfg)
    state = hf_to_clapscale_state(hf.state_dict())
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    missing = sorted(k for k in own if k not in state and k not in buffers)
    # transformers keeps some index buffers (position / token type ids) persistent; RobertaModel does not.
    hf_buffers = set(hf_to_clapscale_state({n: b for n, b in hf.named_buffers()}))
    unexpected = sorted(set(state) - set(own) - hf_buffers)
    if missing or unexpected:
        raise CheckpointMismatchError(f"{src}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    state = {k: v for k, v in state.items() if k in own}
    check_shapes(model, state, where=str(src), strict=False)
    model.load_state_dict(state, strict=False)
    save_model(model, cfg, dst)
    (dst / "imported_from.json").write_text(json.dumps({"source": str(src)}))
    return model.eval(), cfg


# --------------------------------------------------------------------------------------------
# Whole laion_clap checkpoints
# --------------------------------------------------------------------------------------------


def read_laion_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a laion_clap checkpoint in the layouts LAION published: a training checkpoint
    (``{"epoch", "state_dict": {"module.<name>": ...}, "optimizer", ...}``) or a bare state dict,
    with or without ``module.`` prefixes. Loaded with ``weights_only=True`` (no code runs)."""
    import pickle
    import struct
    import zipfile

    try:
        state = read_state_dict(path)
    # What torch.load raises on a damaged or non-torch file, or one that needs code to unpickle, and
    # read_state_dict's ValueError on a pickle that is not a dict of tensors.
    except (pickle.UnpicklingError, RuntimeError, EOFError, struct.error, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointMismatchError(
            f"{path}: not a readable torch checkpoint with tensors only ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); is the download complete?"
        ) from e
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for branch in ("audio_branch.", "text_branch."):
        if not any(k.startswith(branch) for k in state):
            raise CheckpointMismatchError(
                f"{path}: not a laion_clap checkpoint (no {branch}* tensors among {len(state)}); for an "
                "audio tower alone use model.audio.pretrained"
            )
    return state


def laion_htsat_layout(state: dict[str, torch.Tensor], where: str) -> tuple[str, str, int]:
    """``(size, fusion, n_mels)`` of the HTSAT in a laion_clap state dict, read from its tensors:
    the patch embedding width and blocks per stage give the size, ``fusion_model`` the fusion."""
    from clapscale.models.audio.htsat import HTSAT_SIZES

    if "audio_branch.patch_embed.proj.weight" not in state:
        raise CheckpointMismatchError(
            f"{where}: the audio branch is not HTSAT (no audio_branch.patch_embed.proj.weight); only "
            "HTSAT laion_clap checkpoints are imported"
        )
    width = int(state["audio_branch.patch_embed.proj.weight"].shape[0])
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"audio_branch\.layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    depths = [len(blocks[i]) for i in sorted(blocks)]
    size = next((n for n, d in HTSAT_SIZES.items()
                 if d["patch_embeds_hidden_size"] == width and list(d["depths"]) == depths), None)
    if size is None:
        raise CheckpointMismatchError(
            f"{where}: HTSAT with embed {width} and depths {depths} is none of the sizes {', '.join(HTSAT_SIZES)}"
        )
    if any(".fusion_model.local_att2." in k for k in state):
        raise CheckpointMismatchError(f"{where}: iAFF fusion is not supported for HTSAT (aff_2d is)")
    if any(".fusion_model.local_att." in k for k in state):
        fusion = "aff"
    elif any(".mel_conv2d." in k for k in state):
        raise CheckpointMismatchError(f"{where}: DAF fusion is not supported for HTSAT (aff_2d is)")
    else:
        fusion = "none"
    return size, fusion, int(state["audio_branch.bn0.weight"].shape[0])


def import_laion(src: str | Path, dst: str | Path, text_dir: str | Path):
    """Turn a whole laion_clap checkpoint (HTSAT audio tower, RoBERTa or BERT text tower, both
    projections, temperature) into a clapscale model directory at ``dst`` and return
    ``(ClapModel, Config)``.

    ``text_dir`` holds the text tower's ``config.json`` and tokenizer files (a local copy of
    ``roberta-base``, which laion_clap builds its text branch from): a checkpoint carries weights
    only. Every tensor of the model must come from the checkpoint (strict; shapes checked).
    """
    from transformers import AutoConfig

    from clapscale.config import config_from_dict
    from clapscale.models.checkpoint import save_model
    from clapscale.models.factory import build_model

    src, dst, text_dir = Path(src), Path(dst), Path(text_dir)
    state = read_laion_checkpoint(src)
    size, fusion, n_mels = laion_htsat_layout(state, str(src))
    try:
        text_type = AutoConfig.from_pretrained(text_dir, local_files_only=True).model_type
    except (OSError, ValueError) as e:
        raise InteropError(f"--text {text_dir}: no readable config.json ({e}); give the directory of the "
                         "text model the checkpoint was trained with (laion_clap: roberta-base)") from e
    if text_type not in ("roberta", "bert"):
        raise InteropError(f"--text {text_dir}: model_type {text_type!r}; laion_clap text branches imported "
                         "here are roberta or bert")
    if "audio_projection.2.weight" not in state or "logit_scale_a" not in state:
        raise CheckpointMismatchError(f"{src}: no audio_projection.2.weight or logit_scale_a: not a whole CLAP")
    fused = fusion != "none"
    cfg = config_from_dict({
        "audio": {
            "n_mels": n_mels,
            # LAION's fused models use HTK mels without norm, its unfused ones Slaney (DESIGN.md).
            "mel_scale": "htk" if fused else "slaney",
            "length_policy": "fusion" if fused else "rand_trunc",
        },
        "model": {
            "audio": {"name": "htsat", "size": size, "fusion": fusion},
            "text": {"name": text_type, "path": str(text_dir), "pretrained": False},
            "embed_dim": int(state["audio_projection.2.weight"].shape[0]),
        },
    })
    model = build_model(cfg)
    ours = laion_to_clapscale_state(state, "htsat")
    check_shapes(model, ours, where=f"{src} (with --text {text_dir})", strict=True)
    model.load_state_dict(ours, strict=True)
    save_model(model, cfg, dst)
    (dst / "imported_from.json").write_text(json.dumps({"source": str(src), "format": "laion_clap"}))
    return model.eval(), cfg
