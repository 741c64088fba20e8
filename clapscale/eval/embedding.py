"""Embed an evaluation split on every rank and gather it, in a world-size-independent order.

``embed_split`` is what both retrieval and zero-shot evaluation start from. Each rank embeds
the clips its loader yields (each clip is seen exactly once across ranks), all ranks step
together (see ``clapscale.eval.gather``), and the gathered set is sorted by sample key, so one
process and eight processes produce the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clapscale.errors import UserError
from clapscale.features import tower_input
from clapscale.eval.gather import gather_objects, gather_rows, lockstep


class EmptySplitError(UserError, ValueError):
    """No rank read a single sample (raised on every rank alike)."""


@dataclass
class EmbeddedSplit:
    """A gathered evaluation split, sorted by key.

    audio: (A, D) L2-normalised clip embeddings. captions: (C, D) embeddings of every caption
    (empty (0, D) if captions were not embedded); caption_to_audio: (C,) owning clip of each
    caption. keys, texts (captions per clip) and tags are per clip, in the same order.
    """

    audio: Tensor
    captions: Tensor
    caption_to_audio: Tensor
    keys: list[str]
    texts: list[list[str]]
    tags: list[list[str]]
    images: Tensor | None = None  # (A, D) picture embeddings of a tri-modal model (``with_images``)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (bf16 under a bf16 DeepSpeed engine)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def make_text_encoder(
    model: nn.Module, tokenizer: Callable[[list[str]], dict], device: torch.device | str, batch_size: int
) -> Callable[[list[str]], Tensor]:
    """list of N strings -> (N, D) float32 L2-normalised embeddings, in batches of ``batch_size``.

    Every rank must call the returned function with the same number of strings when the model is
    sharded (ZeRO-3): the number of forward calls is ceil(N / batch_size).
    """

    def encode(texts: list[str]) -> Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tok = tokenizer(list(texts[start : start + batch_size]))
            ids = tok["input_ids"].to(device)
            mask = tok["attention_mask"].to(device)
            out.append(model.encode_text(ids, mask).float())
        if not out:
            raise ValueError("no texts to encode")
        return torch.cat(out)

    return encode


def _dummy_audio(channels: int, n_frames: int, n_mels: int, device, dtype) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(1, channels, n_frames, n_mels, device=device, dtype=dtype),
        torch.zeros(1, dtype=torch.bool, device=device),
    )


@torch.inference_mode()
def embed_split(
    model: nn.Module,
    frontend: nn.Module,
    tokenizer: Callable[[list[str]], dict] | None,
    batches: Iterable[dict],
    *,
    world_size: int,
    device: torch.device | str,
    with_captions: bool,
    max_clips: int = 0,
    with_images: bool = False,
) -> EmbeddedSplit:
    """Embed this rank's batches, gather across ranks, sort by key.

    Args:
        model: exposes ``encode_audio(mel (B, C, T, M), is_longer (B,)) -> (B, D)`` and
            ``encode_text(input_ids, attention_mask) -> (B, D)``; put in eval mode by the caller.
        frontend: ``clapscale.features.AudioFrontend`` on ``device``.
        tokenizer: required when ``with_captions``.
        batches: this rank's loader (keys ``waveform``/``mel``, ``is_longer``, ``keys``,
            ``all_texts``, ``tags``, ...).
        with_images: also embed each clip's picture (batch key ``image``) with ``model.encode_image``
            (a ``TriModalClap``), into ``images``.
        max_clips: keep only the ``max_clips`` clips with the smallest keys of the gathered split
            (0 = all). It does not shorten the loop: to bound the cost, give a loader over fewer
            shards (``clapscale.eval.runner`` does, see ``limit_spec``).

    Raises (on every rank alike, never on one rank only): ``ValueError`` for a batch with clips
    without captions when ``with_captions`` (on the rank holding it; ``RankFailedError`` naming that
    rank on the others), ``EmptySplitError`` when no rank read a sample.
    """
    if with_captions and tokenizer is None:
        raise ValueError("embedding captions needs a tokenizer")
    if with_images and not hasattr(model, "encode_image"):
        raise ValueError("audio<->image evaluation needs a model with an image tower (model.image.name)")
    dtype = model_dtype(model)
    audio, texts_emb, images = [], [], []
    keys: list[str] = []
    texts: list[list[str]] = []
    tags: list[list[str]] = []
    # Exactly one text forward per step (all captions of the batch at once), so that every rank
    # makes the same number of forward calls whatever its caption counts (ZeRO-3 pairs them).
    encode_text = make_text_encoder(model, tokenizer, device, 1 << 30) if with_captions else None
    dim = None

    def dummy_step() -> int:
        # One throw-away forward of each tower keeps ZeRO-3's parameter all-gathers paired across
        # ranks on a step where this rank has no (usable) batch.
        if model.audio_tower.input_kind == "waveform":
            mel = torch.zeros(1, 1, frontend.cfg.clip_samples, device=device, dtype=dtype)
            longer = torch.zeros(1, dtype=torch.bool, device=device)
        else:
            mel, longer = _dummy_audio(frontend.channels, frontend.n_frames, frontend.cfg.n_mels, device, dtype)
        d = model.encode_audio(mel, longer).shape[1]
        if encode_text is not None:
            encode_text(["."])
        if with_images:
            size = model.image_tower.image_size
            model.encode_image(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
        return d

    steps = lockstep(batches, world_size, device)
    for batch in steps:
        # An error on this rank is raised on every rank at the next step (see Lockstep.guard).
        with steps.guard():
            problem = None
            if batch is not None and encode_text is not None:
                n = len(batch["keys"])
                empty = [k for k, clip in zip(batch["keys"], batch.get("all_texts", [[]] * n)) if not clip]
                if empty:
                    problem = f"clips without captions cannot be evaluated for retrieval: {empty[:5]}"
            if batch is not None and with_images and "image" not in batch:
                problem = "audio<->image evaluation needs batches with pictures: set data.image_size"
            if batch is None or problem is not None:
                # Checked before any forward, and a bad batch still makes this step's forwards, so
                # the ranks stay paired under ZeRO-3 up to the step where they all raise.
                dim = dummy_step()
                if problem is not None:
                    raise ValueError(problem)
                continue
            mel, longer = tower_input(frontend, batch, model.audio_tower.input_kind)
            audio.append(model.encode_audio(mel.to(dtype), longer).float())
            keys += [str(k) for k in batch["keys"]]
            n = len(batch["keys"])
            clip_texts = [list(t) for t in batch.get("all_texts", [[]] * n)]
            texts += clip_texts
            tags += [list(t) for t in batch.get("tags", [[]] * n)]
            if encode_text is not None:
                texts_emb.append(encode_text([c for clip in clip_texts for c in clip]))
            if with_images:
                images.append(model.encode_image(batch["image"].to(device=device, dtype=dtype)).float())

    if audio:
        dim = audio[0].shape[1]
    if dim is None:
        # No rank had any data (a rank that had none ran the dummy forward and knows the size).
        raise EmptySplitError("the evaluation split is empty on every rank: check the shard spec")
    local_audio = torch.cat(audio) if audio else torch.zeros(0, dim, device=device)
    local_caps = torch.cat(texts_emb) if texts_emb else torch.zeros(0, dim, device=device)
    all_audio = gather_rows(local_audio.to(device), world_size).cpu()
    all_caps = gather_rows(local_caps.to(device), world_size).cpu()
    if with_images:
        local_images = torch.cat(images) if images else torch.zeros(0, dim, device=device)
        all_images = gather_rows(local_images.to(device), world_size).cpu()
    meta = gather_objects((keys, texts, tags), world_size)
    keys = [k for m in meta for k in m[0]]
    texts = [t for m in meta for t in m[1]]
    tags = [t for m in meta for t in m[2]]

    order = sorted(range(len(keys)), key=lambda i: keys[i])
    if max_clips:
        # The same subset whatever the world size: the gathered set is, and so is its key order.
        order = order[:max_clips]
    counts = [len(t) for t in texts]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    audio_sorted = all_audio[order] if order else all_audio
    if with_captions:
        cap_index = [j for i in order for j in range(offsets[i], offsets[i + 1])]
        caps_sorted = all_caps[cap_index]
        owner = torch.tensor([new for new, i in enumerate(order) for _ in range(counts[i])], dtype=torch.long)
    else:
        caps_sorted = torch.zeros(0, all_audio.shape[1])
        owner = torch.zeros(0, dtype=torch.long)
    return EmbeddedSplit(
        audio=audio_sorted,
        captions=caps_sorted,
        caption_to_audio=owner,
        keys=[keys[i] for i in order],
        texts=[texts[i] for i in order],
        tags=[tags[i] for i in order],
        images=(all_images[order] if order else all_images) if with_images else None,
    )

