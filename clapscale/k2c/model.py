"""A keyword-to-caption model: a transformers seq2seq model (T5 family) and its tokenizer, read
from a local directory only (nothing downloads), and caption generation from tag lists.

The prompt a model expects is part of the model: ``k2c --train`` writes it to ``k2c.json`` beside
the weights, and generation reads it from there (``DEFAULT_PROMPT`` for a directory without one,
e.g. a T5 fine-tuned elsewhere; ``--prompt`` overrides both).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clapscale.errors import UserError

K2C_META = "k2c.json"
DEFAULT_PROMPT = "keywords: {tags}"


class K2CModelError(UserError):
    """The model directory cannot be used (missing, no weights, no tokenizer)."""


def format_prompt(template: str, tags: list[str]) -> str:
    """``"keywords: {tags}"``, ``["Dog", "rain_drops"]`` -> ``"keywords: Dog, rain drops"``."""
    return template.format(tags=", ".join(t.replace("_", " ").strip() for t in tags if t.strip()))


def model_checksum(path: str | Path) -> str:
    """sha256 over the directory's files (relative names and contents, sorted): what the derived
    shard set's manifest records as the producing model."""
    root = Path(path)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            h.update(str(full.relative_to(root)).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


@dataclass
class K2CModel:
    model: Any  # transformers PreTrainedModel (encoder-decoder)
    tokenizer: Any
    prompt: str
    path: Path


def load_k2c_model(path: str | Path, device: str | torch.device = "cpu", prompt: str | None = None) -> K2CModel:
    """The seq2seq model and tokenizer in ``path`` (local files only), in eval mode on ``device``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise K2CModelError(f"--model {path}: no config.json; give a local transformers seq2seq model directory "
                            "(e.g. one written by `clapscale k2c --train`)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise K2CModelError(f"--model {path}: cannot load a seq2seq model and tokenizer from it ({e})") from e
    meta_path = path / K2C_META
    stored = json.loads(meta_path.read_text()).get("prompt") if meta_path.is_file() else None
    template = prompt or stored or DEFAULT_PROMPT
    if "{tags}" not in template:
        raise K2CModelError(f"--prompt {template!r}: must contain {{tags}}")
    return K2CModel(model.to(device).eval(), tokenizer, template, path)


@dataclass
class GenerationOptions:
    """How captions are decoded: beam search (``sample=False``: the ``num_captions`` best of
    ``beams`` beams) or nucleus sampling (``num_captions`` independent draws)."""

    num_captions: int = 3
    beams: int = 3
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 48

    def validate(self) -> None:
        if self.num_captions < 1 or self.max_new_tokens < 1:
            raise UserError(f"--num-captions ({self.num_captions}) and --max-new-tokens ({self.max_new_tokens}) must be >= 1")
        if not self.sample and self.beams < self.num_captions:
            raise UserError(f"--beams {self.beams} < --num-captions {self.num_captions}: beam search returns at most "
                            "one caption per beam; raise --beams or use --sample")
        if self.sample and not (0 < self.top_p <= 1 and self.temperature > 0):
            raise UserError(f"--top-p must be in (0, 1] and --temperature > 0, got {self.top_p}, {self.temperature}")


@torch.inference_mode()
def generate_captions(k2c: K2CModel, tag_lists: list[list[str]], opts: GenerationOptions,
                      generator_seed: int | None = None) -> list[list[str]]:
    """One batch: ``tag_lists`` (B lists of tags) -> B lists of up to ``num_captions`` distinct
    captions (duplicates after decoding are dropped, order kept). Sampling is seeded by
    ``generator_seed`` so a rerun of the same batch draws the same captions."""
    prompts = [format_prompt(k2c.prompt, tags) for tags in tag_lists]
    device = next(k2c.model.parameters()).device
    enc = k2c.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kwargs: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "num_return_sequences": opts.num_captions}
    if opts.sample:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        kwargs.update(do_sample=True, top_p=opts.top_p, temperature=opts.temperature, num_beams=1)
    else:
        kwargs.update(do_sample=False, num_beams=opts.beams)
    out = k2c.model.generate(**enc, **kwargs)
    texts = k2c.tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    result = []
    for i in range(len(tag_lists)):
        group = [t.strip() for t in texts[i * opts.num_captions:(i + 1) * opts.num_captions]]
        result.append(list(dict.fromkeys(t for t in group if t)))
    return result
