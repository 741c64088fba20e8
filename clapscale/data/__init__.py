"""Streaming input: shards -> batches for the trainer and evaluation.

``build_loader(cfg, spec, tokenizer=None, rank=0, world_size=1, train=True)`` returns an iterable of
batch dicts (B = data.batch_size; the last evaluation batch may be shorter):

=================  ================================  =============================================
key                type / shape                      meaning
=================  ================================  =============================================
waveform           float32 (B, N)                    mono 48 kHz audio after the length policy;
                                                     N = clip_samples (480000) except with fusion,
                                                     where longer clips are kept whole (at most
                                                     audio.max_seconds) and rows are zero-padded
                                                     to the longest. Absent when ``mel`` is given.
mel                float32 (B, T, n_mels)            DALI backend only: log-mel dB already computed
                                                     (rows padded to the longest, see mel_frames)
mel_frames         int64 (B,)                        DALI backend only: valid frames per mel row
lengths            int64 (B,)                        real samples of each clip (after the
                                                     max_seconds cap, before padding / cropping)
is_longer          bool (B,)                         clip has more STFT frames than one 10 s chunk
fusion_starts      int64 (B, 3)                      fusion chunk starts (frames into the clip's
                                                     full mel); zeros unless fusion and longer
input_ids          int64 (B, L)                      only with a tokenizer
attention_mask     int64 (B, L)                      only with a tokenizer
keys               list[str]                         sample keys
texts              list[str]                         the caption drawn for this sample this epoch
all_texts          list[list[str]]                   every caption (JSON "text"), for retrieval
tags               list[list[str]]                   labels (JSON "tag", or "tags"), possibly empty
=================  ================================  =============================================

``clapscale.features.AudioFrontend`` turns such a batch into the tower input ``(B, C, 1001, 64)``.

Backends (``data.backend``): ``wds`` (``clapscale.data.wds``: PyTorch DataLoader workers, soundfile)
and ``dali`` (``clapscale.data.dali``: DALI reader + decoder, mel in DALI on the GPU or CPU). Both
read a fresh permutation of the shards every epoch (the same one for a given seed), realise mixing
weights per sample with ``data.resampled: true`` (each source's share of samples is its weight,
whatever its shard sizes) and read every shard once per epoch with ``data.resampled: false``. Both
apply the same length policies and caption choice with the same per-(seed, epoch, key) generator,
skip the same bad samples, and read tags the same way (``captions.normalise_tags``).

Loader API: iterate; ``set_epoch(e)``; ``state_dict()`` / ``load_state_dict(d)`` (the sample
position, so a resumed run continues); ``skipped`` (reason -> count of bad samples skipped, see
``clapscale.data.wds.SKIP_REASONS``); ``warned`` (reason -> count of samples read with a coerced
field, ``WARN_REASONS``); ``source_counts`` (training samples yielded per source, logged as realised
shares at the end of every epoch); ``len(loader)`` (batches per epoch on this rank).

``data.replay`` (wds backend) wraps the training loader in ``clapscale.data.replay.ReplayLoader``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clapscale.config import Config
from clapscale.data.specs import parse_spec


def build_loader(
    cfg: Config,
    spec: str,
    *,
    tokenizer: Callable[[list[str]], dict[str, Any]] | None = None,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
) -> Any:
    """The loader for ``spec`` on this rank, with the backend named by ``cfg.data.backend``.

    ``train=False``: deterministic, no shuffle, no random crop, every sample exactly once across
    ranks. Mixing weights (``cfg.data.train_weights``) apply to the training spec only.
    """
    weights = cfg.data.train_weights if (train and spec == cfg.data.train) else ""
    sources = parse_spec(spec, weights)
    if cfg.data.backend == "dali":
        from clapscale.data.dali import DaliLoader

        return DaliLoader(
            sources, cfg.audio, cfg.data, tokenizer=tokenizer, rank=rank, world_size=world_size, train=train
        )
    from clapscale.data.wds import WdsLoader

    loader = WdsLoader(
        sources, cfg.audio, cfg.data, tokenizer=tokenizer, rank=rank, world_size=world_size, train=train
    )
    if train and spec == cfg.data.train and cfg.data.replay.spec:
        from clapscale.data.replay import ReplayLoader

        replay = WdsLoader(parse_spec(cfg.data.replay.spec), cfg.audio, cfg.data, tokenizer=tokenizer,
                           rank=rank, world_size=world_size, train=True)
        return ReplayLoader(loader, replay, cfg.data.replay.prob, cfg.data.seed)
    return loader


__all__ = ["build_loader"]
