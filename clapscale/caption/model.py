"""The tag-guided captioner: an audio tower plus tag embeddings as the memory of a transformer decoder.

As in papers/clap-synthetic-captions-audioset.txt (3.2, Figure 1), the decoder predicts token t from
the tokens before it, the clip's tags (tag embedding TE) and the audio encoder's representation:
here the pooled output of any clapscale audio tower, projected to ``audio_tokens`` memory vectors,
followed by one memory vector per tag. The decoder is torch's ``nn.TransformerDecoder`` (pre-norm,
causal self-attention, cross-attention to that memory); its output layer shares the word embedding.

Words come from a tokenizer the project already ships (the text tower's: MiniLM / BERT / RoBERTa
WordPiece or BPE). The decoder's vocabulary is the part of it that occurs in the training captions
(``CaptionVocab``): a captioner cannot learn to write a token it never saw, and the output layer
stays small. The tag vocabulary is the set of tags in the training data; it is also what the
generation filter checks (clips with a tag outside it are skipped, as the paper skips AudioSet clips
whose tags never occur in AudioCaps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = 4


@dataclass
class CaptionVocab:
    """Decoder tokens (``token_ids[i]`` = the tokenizer id of decoder id ``i + 4``) and tags (tag ``tags[i]`` has id ``i + 1``)."""

    token_ids: list[int]
    tags: list[str]

    @property
    def n_tokens(self) -> int:
        return _SPECIALS + len(self.token_ids)

    def __post_init__(self) -> None:
        self._token_index = {t: i + _SPECIALS for i, t in enumerate(self.token_ids)}
        self._tag_index = {t: i + 1 for i, t in enumerate(self.tags)}

    @classmethod
    def from_captions(cls, hf_tokenizer, captions: list[str], tags: list[str]) -> "CaptionVocab":
        ids = set()
        for c in captions:
            ids.update(hf_tokenizer(c, add_special_tokens=False)["input_ids"])
        return cls(token_ids=sorted(ids), tags=sorted(set(tags)))

    def has_tag(self, tag: str) -> bool:
        return tag in self._tag_index

    def encode_caption(self, hf_tokenizer, caption: str, max_length: int) -> list[int]:
        """``[BOS, w1, ..., EOS]`` in decoder ids (at most ``max_length``; unknown tokens -> UNK)."""
        ids = hf_tokenizer(caption, add_special_tokens=False)["input_ids"]
        return [BOS] + [self._token_index.get(i, UNK) for i in ids][: max_length - 2] + [EOS]

    def decode_caption(self, hf_tokenizer, ids: list[int]) -> str:
        """Decoder ids -> text, stopping at EOS; specials are dropped."""
        words = []
        for i in ids:
            if i == EOS:
                break
            if i >= _SPECIALS:
                words.append(self.token_ids[i - _SPECIALS])
        return hf_tokenizer.decode(words, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()

    def tag_batch(self, tags: list[list[str]], max_tags: int) -> Tensor:
        """Tag ids ``(B, max_tags)``, 0-padded; tags outside the vocabulary are left out."""
        out = torch.zeros(len(tags), max_tags, dtype=torch.long)
        for b, clip in enumerate(tags):
            known = [self._tag_index[t] for t in clip if t in self._tag_index][:max_tags]
            out[b, : len(known)] = torch.tensor(known, dtype=torch.long)
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"token_ids": self.token_ids, "tags": self.tags}, indent=0) + "\n")

    @classmethod
    def load(cls, path: Path) -> "CaptionVocab":
        raw = json.loads(Path(path).read_text())
        return cls(token_ids=[int(i) for i in raw["token_ids"]], tags=[str(t) for t in raw["tags"]])


def pad_captions(captions: list[list[int]]) -> Tensor:
    """Decoder id lists -> ``(B, L)`` long, PAD-filled."""
    out = torch.full((len(captions), max(len(c) for c in captions)), PAD, dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out


class TagGuidedCaptioner(nn.Module):
    """``forward(mel (B, 1, T, F), is_longer (B,), tag_ids (B, K), tokens (B, L)) -> logits (B, L-1, V)``
    for the next token of every prefix of ``tokens`` (teacher forcing, with scheduled sampling when
    ``sampling_prob > 0``)."""

    def __init__(self, audio_tower: nn.Module, n_tokens: int, n_tags: int, *, d_model: int, layers: int,
                 heads: int, ff_dim: int, dropout: float, audio_tokens: int, max_length: int,
                 freeze_audio: bool = False) -> None:
        super().__init__()
        self.audio_tower = audio_tower
        self.freeze_audio = freeze_audio
        if freeze_audio:
            audio_tower.requires_grad_(False)
        self.audio_tokens = audio_tokens
        self.d_model = d_model
        self.max_length = max_length
        self.audio_proj = nn.Linear(audio_tower.out_dim, audio_tokens * d_model)
        self.tag_embed = nn.Embedding(n_tags + 1, d_model, padding_idx=0)
        self.word_embed = nn.Embedding(n_tokens, d_model, padding_idx=PAD)
        self.pos_embed = nn.Embedding(max_length, d_model)
        self.memory_kind = nn.Embedding(2, d_model)  # 0: audio, 1: tag
        layer = nn.TransformerDecoderLayer(d_model, heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(d_model)
        self.sampling_prob = 0.0
        # The output layer is the word embedding: unit-variance logits at init need std d^-0.5.
        nn.init.normal_(self.word_embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.word_embed.weight[PAD].zero_()

    def train(self, mode: bool = True) -> "TagGuidedCaptioner":
        super().train(mode)
        if self.freeze_audio:
            self.audio_tower.eval()  # frozen: its batch-norm statistics stay as loaded
        return self

    def encode(self, mel: Tensor, is_longer: Tensor, tag_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Memory ``(B, A + K, d)`` and its padding mask ``(B, A + K)`` (True = ignore)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_audio):
            pooled = self.audio_tower(mel, is_longer)
        audio = self.audio_proj(pooled).view(pooled.shape[0], self.audio_tokens, self.d_model)
        audio = audio + self.memory_kind.weight[0]
        tags = self.tag_embed(tag_ids) + self.memory_kind.weight[1]
        pad = torch.cat([torch.zeros(audio.shape[:2], dtype=torch.bool, device=audio.device), tag_ids == 0], dim=1)
        return torch.cat([audio, tags], dim=1), pad

    def decode(self, tokens: Tensor, memory: Tensor, memory_pad: Tensor) -> Tensor:
        """Next-token logits ``(B, L, V)`` for ``tokens (B, L)`` (causal)."""
        L = tokens.shape[1]
        pos = torch.arange(L, device=tokens.device)
        x = self.word_embed(tokens) * self.d_model**0.5 + self.pos_embed(pos)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=tokens.device), diagonal=1)
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=tokens == PAD,
                         memory_key_padding_mask=memory_pad)
        return self.norm(h) @ self.word_embed.weight.t()

    def forward(self, mel: Tensor, is_longer: Tensor, tag_ids: Tensor, tokens: Tensor) -> Tensor:
        memory, memory_pad = self.encode(mel, is_longer, tag_ids)
        inputs = tokens[:, :-1]
        if self.training and self.sampling_prob > 0:
            # Scheduled sampling for a transformer (two passes, Mihaylova & Martins 2019): the
            # first, without gradient, predicts every position; some inputs are then replaced by
            # the prediction made for them, so the model learns to continue from its own words.
            with torch.no_grad():
                predicted = self.decode(inputs, memory, memory_pad).argmax(-1)
            own = torch.cat([inputs[:, :1], predicted[:, :-1]], dim=1)  # prediction for position t
            swap = (torch.rand(inputs.shape, device=inputs.device) < self.sampling_prob) & (inputs != PAD)
            swap[:, 0] = False  # BOS stays
            inputs = torch.where(swap, own, inputs)
        return self.decode(inputs, memory, memory_pad)


def caption_loss(logits: Tensor, tokens: Tensor, label_smoothing: float) -> Tensor:
    """Label-smoothed cross-entropy of ``logits (B, L-1, V)`` against ``tokens[:, 1:]``, PAD ignored."""
    target = tokens[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing)


@torch.no_grad()
def generate(model: TagGuidedCaptioner, mel: Tensor, is_longer: Tensor, tag_ids: Tensor, *,
             beam: int = 3, max_length: int | None = None) -> list[list[int]]:
    """Decoder ids of one caption per clip (without BOS, up to and without EOS).

    ``beam == 1`` is greedy decoding. Beam search keeps ``beam`` hypotheses per clip, scores them by
    summed log-probability, and picks the finished one with the best mean log-probability per token
    (EOS included), so longer captions are not penalised for their length alone.
    """
    model.eval()
    max_length = max_length or model.max_length
    memory, memory_pad = model.encode(mel, is_longer, tag_ids)
    B, device = memory.shape[0], memory.device
    K = max(1, beam)
    memory = memory.repeat_interleave(K, dim=0)
    memory_pad = memory_pad.repeat_interleave(K, dim=0)
    tokens = torch.full((B * K, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    lengths = torch.zeros(B * K, device=device)
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    for _ in range(max_length - 1):
        logp = F.log_softmax(model.decode(tokens, memory, memory_pad)[:, -1].float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        # A finished hypothesis only extends with PAD, at no cost: its score stays.
        finished_row = torch.full((V,), float("-inf"), device=device)
        finished_row[PAD] = 0.0
        logp = torch.where(done[:, None], finished_row, logp)
        cand = (scores.view(B, K, 1) + logp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(K, dim=1)
        origin = (idx // V) + torch.arange(B, device=device)[:, None] * K  # (B, K) rows in B*K
        nxt = (idx % V).view(-1)
        origin = origin.view(-1)
        tokens = torch.cat([tokens[origin], nxt[:, None]], dim=1)
        was_done = done[origin]
        lengths = lengths[origin] + (~was_done).float()
        done = was_done | (nxt == EOS)
        scores = top
        if bool(done.all()):
            break
    final = scores.view(-1) / lengths.clamp(min=1)
    final = torch.where(done, final, final - 1e4)  # prefer hypotheses that ended
    best = final.view(B, K).argmax(dim=1) + torch.arange(B, device=device) * K
    out = []
    for row in tokens[best, 1:].tolist():
        ids = []
        for t in row:
            if t in (EOS, PAD):
                break
            ids.append(t)
        out.append(ids)
    return out
