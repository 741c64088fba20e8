"""``clapscale k2c --train``: a small T5 trained (or a local one fine-tuned) on (tags -> caption)
pairs from captioned shards that also carry tags.

Tokenizer: a new model gets a WordPiece tokenizer trained here on the pairs' own text (the
``tokenizers`` library, lower-cased, BERT pre-tokenisation). A vocabulary the size of the corpus
(hundreds to a few thousand pieces) keeps the embedding and output softmax of a tiny T5 small
enough to train on a CPU in minutes, where a reused 30k BERT vocabulary (the MiniLM tokenizer that
ships offline) would make both ~50x larger for words the corpus never uses; WordPiece still spells
unseen words from pieces and characters. ``--tokenizer DIR`` reuses an existing tokenizer instead,
and fine-tuning (``--init-from``) always keeps the model's own.

Pairs: every caption of a sample with tags, except a caption that is only the tag template ("The
sound of A and B"): the model is meant to say more than the template does.
"""

from __future__ import annotations

import json
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clapscale.data.captions import clean_captions, normalise_tags, tag_caption
from clapscale.errors import UserError
from clapscale.k2c.model import DEFAULT_PROMPT, K2C_META, format_prompt

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass
class K2CTrainConfig:
    """A tiny T5 by default (0.9 M parameters with a 2000-piece vocabulary, 0.17 M at d_model 64);
    ``t5_config`` (a T5Config JSON file) replaces the size fields."""

    d_model: int = 128
    d_ff: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 2000  # upper bound for a tokenizer trained here
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    dropout: float = 0.1
    label_smoothing: float = 0.1
    seed: int = 0
    max_caption_tokens: int = 48
    prompt: str = DEFAULT_PROMPT
    t5_config: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    split: str = "train"

    def validate(self) -> None:
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size", "steps", "batch_size", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"k2c --train: {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise UserError(f"k2c --train: --d-model {self.d_model} must be a multiple of --num-heads {self.num_heads}")
        if not (self.lr > 0 and 0 <= self.dropout < 1 and 0 <= self.label_smoothing < 1):
            raise UserError("k2c --train: --lr must be > 0, --dropout and --label-smoothing in [0, 1)")
        if "{tags}" not in self.prompt:
            raise UserError(f"k2c --train: --prompt {self.prompt!r} must contain {{tags}}")


def read_json_members(tar_path: Path) -> Iterator[dict[str, Any]]:
    """The ``.json`` members of one local shard (the audio is passed over by seeking, not read)."""
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                f = tar.extractfile(member)
                if f is not None:
                    try:
                        meta = json.loads(f.read())
                    except ValueError:
                        continue
                    if isinstance(meta, dict):
                        yield meta


def tag_caption_pairs(shard_sets: list[Path], split: str = "train") -> list[tuple[list[str], str]]:
    """(tags, caption) for every caption of every tagged sample in ``<set>/<split>/*.tar``."""
    pairs = []
    for root in shard_sets:
        tars = sorted((Path(root) / split).glob("*.tar"))
        if not tars:
            raise UserError(f"k2c --train: no {split}/*.tar under {root}; give shard sets with a {split!r} split")
        for tar in tars:
            for meta in read_json_members(tar):
                tags, _ = normalise_tags(meta)
                if not tags:
                    continue
                template = tag_caption(tags).rstrip(".").lower()
                for caption in clean_captions(meta.get("text")):
                    if caption.rstrip(".").lower() != template:
                        pairs.append((tags, caption))
    if not pairs:
        raise UserError(f"k2c --train: no sample in {', '.join(map(str, shard_sets))} has both tags and a caption "
                        "other than the tag template; K2C needs (tags, caption) pairs")
    return pairs


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int):
    """A lower-cased WordPiece tokenizer trained on ``texts``, wrapped for transformers (appends
    ``</s>`` as T5 expects; ``<pad>`` is id 0, T5's decoder start token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK]))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def new_t5(cfg: K2CTrainConfig, tokenizer) -> Any:
    """A randomly initialised ``T5ForConditionalGeneration`` sized by ``cfg`` for ``tokenizer``."""
    from transformers import T5Config, T5ForConditionalGeneration

    if cfg.t5_config:
        config = T5Config.from_json_file(cfg.t5_config)
    else:
        config = T5Config(d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_model // cfg.num_heads, num_layers=cfg.num_layers,
                          num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=cfg.dropout,
                          feed_forward_proj="relu", tie_word_embeddings=True)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.decoder_start_token_id = tokenizer.pad_token_id
    return T5ForConditionalGeneration(config)


@dataclass
class TrainResult:
    pairs: int
    parameters: int
    losses: list[float] = field(default_factory=list)  # mean loss per 100 steps


def _batches(pairs: list[tuple[str, str]], batch_size: int, rng: random.Random) -> Iterator[list[tuple[str, str]]]:
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):  # batch_size <= len(pairs)
            yield [pairs[j] for j in order[i:i + batch_size]]


def train_k2c(shard_sets: list[Path], out: Path, cfg: K2CTrainConfig, device: str = "cpu",
              progress: bool = True) -> TrainResult:
    """Train (or fine-tune) a K2C model on the shard sets' (tags -> caption) pairs and save it to
    ``out`` (weights, tokenizer, ``k2c.json`` with the prompt and what it was trained on)."""
    from tqdm import tqdm
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cfg.validate()
    torch.manual_seed(cfg.seed)
    raw = tag_caption_pairs(shard_sets, cfg.split)
    pairs = [(format_prompt(cfg.prompt, tags), caption) for tags, caption in raw]
    if cfg.init_from:
        tokenizer = AutoTokenizer.from_pretrained(cfg.init_from, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.init_from, local_files_only=True)
    else:
        if cfg.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        else:
            tokenizer = train_wordpiece_tokenizer([p for pair in pairs for p in pair], cfg.vocab_size)
        model = new_t5(cfg, tokenizer)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=cfg.label_smoothing)
    batches = _batches(pairs, min(cfg.batch_size, len(pairs)), random.Random(cfg.seed))
    result = TrainResult(pairs=len(pairs), parameters=sum(p.numel() for p in model.parameters()))
    window: list[float] = []
    bar = tqdm(range(cfg.steps), desc="k2c train", unit="step", disable=not progress)
    for step in bar:
        batch = next(batches)
        enc = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True, truncation=True, max_length=128)
        tgt = tokenizer([c for _, c in batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=cfg.max_caption_tokens)
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                       labels=labels.to(device)).logits
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if len(window) == 100 or step == cfg.steps - 1:
            result.losses.append(sum(window) / len(window))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            window = []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"prompt": cfg.prompt, "trained_on": [str(s) for s in shard_sets], "pairs": len(pairs),
            "parameters": result.parameters, "config": asdict(cfg), "loss_per_100_steps": result.losses}
    (out / K2C_META).write_text(json.dumps(meta, indent=1) + "\n")
    return result
