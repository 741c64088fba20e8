"""The public inference API: load a trained CLAP and embed audio and text, or tag audio zero-shot.

    >>> import clapscale.inference as ci
    >>> clap = ci.load("runs/demo/model")                   # exported directory or trainer checkpoint
    >>> a = clap.embed_audio(["dog.wav", "rain.flac"])        # (2, D) float32, unit rows
    >>> t = clap.embed_text(["a dog barks", "rain on a roof"])  # (2, D)
    >>> clap.zero_shot(["dog.wav"], ["dog", "rain", "siren"])  # (1, 3) probabilities

Audio may be file paths (any format libsndfile reads) or arrays with ``sample_rate=``; any length,
sample rate and channel count: channels are averaged, audio is resampled to the model's rate and
cut at ``audio.max_seconds`` (as in training). Embeddings are deterministic: the same input gives
the same embedding on every call (no random crop; fusion chunks at fixed positions, the midpoint
of each third; eval mode; no autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from clapscale.config import Config
from clapscale.data.policies import apply_length_policy
from clapscale.errors import UserError
from clapscale.eval.embedding import make_text_encoder, model_dtype
from clapscale.eval.zeroshot import DEFAULT_TEMPLATES, check_labels, encode_labels
from clapscale.features import AudioFrontend, tower_input
from clapscale.models.loading import load_trained_model
from clapscale.shards.audio_io import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioDecodeError,
    load_audio,
    resample,
)

AudioInput = Union[str, Path, np.ndarray, Tensor]


class InferenceError(UserError, ValueError):
    """An input to the inference API is unusable; the message names it and what to do."""


class Clap:
    """A loaded CLAP model ready for embedding. Build with :func:`load`.

    Attributes: ``model`` (the ``ClapModel``), ``cfg`` (its ``Config``), ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        tokenizer: Callable[[list[str]], dict],
        device: torch.device | str = "cpu",
        source: str = "",
    ):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.source = source
        self.frontend = AudioFrontend(cfg.audio).to(self.device)

    @property
    def embed_dim(self) -> int:
        return int(self.cfg.model.embed_dim)

    # ------------------------------------------------------------------------------ audio

    def load_waveform(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        """One clip -> mono float32 ``(n,)`` at the model's sample rate, at most ``audio.max_seconds``."""
        sr = self.cfg.audio.sample_rate
        if isinstance(audio, (str, Path)):
            path = Path(audio)
            if not path.exists():
                raise FileNotFoundError(f"audio file not found: {path}")
            if path.is_dir():
                raise InferenceError(f"{path} is a directory, not an audio file")
            try:
                return load_audio(path, target_sr=sr, max_seconds=self.cfg.audio.max_seconds)
            except AudioDecodeError as e:
                raise InferenceError(f"cannot read audio {path}: {e.reason}") from e
        if isinstance(audio, Tensor):
            audio = audio.detach().cpu().numpy()
        if not isinstance(audio, np.ndarray):
            raise InferenceError(
                f"audio must be a file path or a numpy array / torch tensor, got {type(audio).__name__}"
            )
        if sample_rate is None:
            raise InferenceError("audio given as an array needs its sample_rate= (e.g. sample_rate=44100)")
        if not isinstance(sample_rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise InferenceError(
                f"sample_rate must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {sample_rate!r}"
            )
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim == 2:
            # (channels, samples) or (samples, channels): the short axis is the channel axis.
            ch_axis = int(np.argmin(x.shape))
            if x.shape[ch_axis] > MAX_CHANNELS or x.shape[ch_axis] == x.shape[1 - ch_axis]:
                raise InferenceError(
                    f"cannot tell channels from samples in an array of shape {x.shape}: pass mono (n,) or "
                    f"(channels, n) with at most {MAX_CHANNELS} channels"
                )
            x = x.mean(axis=ch_axis)
        elif x.ndim != 1:
            raise InferenceError(f"an audio array must be (n,) or (channels, n), got shape {x.shape}")
        if x.size == 0:
            raise InferenceError("zero-length audio array")
        if not np.isfinite(x).all():
            raise InferenceError("audio array holds NaN or infinite samples")
        x = x[: int(math.ceil(self.cfg.audio.max_seconds * sample_rate))]
        return resample(x, int(sample_rate), sr)

    def _batch(self, waves: list[np.ndarray]) -> dict[str, Tensor]:
        """Mono waves -> the loader's batch layout (see ``clapscale.data``), policy applied with no randomness."""
        res = [apply_length_policy(w, self.cfg.audio, None) for w in waves]
        n = max(len(r.waveform) for r in res)
        wave = np.zeros((len(res), n), dtype=np.float32)
        for i, r in enumerate(res):
            wave[i, : len(r.waveform)] = r.waveform
        return {
            "waveform": torch.from_numpy(wave),
            "lengths": torch.tensor([r.length for r in res], dtype=torch.int64),
            "is_longer": torch.tensor([r.is_longer for r in res], dtype=torch.bool),
            "fusion_starts": torch.tensor([r.fusion_starts for r in res], dtype=torch.int64),
        }

    def embed_audio(
        self,
        audio: AudioInput | Sequence[AudioInput],
        sample_rate: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> Tensor:
        """Embed clips: a path or array, or a list of them -> ``(N, D)`` float32 CPU, unit rows.

        Args:
            audio: file path(s) and/or arrays; an array is one clip, ``(n,)`` or ``(channels, n)``.
            sample_rate: sample rate of the arrays (required for arrays, ignored for files).
            batch_size: clips per forward pass.
            progress: show a tqdm progress bar.

        The first clip that cannot be used raises (``InferenceError``, ``FileNotFoundError``); see
        :meth:`embed_audio_files` to carry on past unreadable files.
        """
        emb, _ = self._embed(_as_list(audio), sample_rate, batch_size, progress, keep_going=False)
        return emb

    def embed_audio_files(
        self, files: Sequence[str | Path], batch_size: int = 8, progress: bool = False
    ) -> tuple[Tensor, dict[int, str]]:
        """Embed audio files, carrying on past the ones that cannot be read.

        Returns ``(N, D)`` float32 with one row per file in the given order (a file that failed has a
        row of NaN, so it cannot pass for an embedding) and ``{index: reason}`` for the failed files.
        """
        return self._embed(list(files), None, batch_size, progress, keep_going=True)

    @torch.inference_mode()
    def _embed(
        self, items: list[AudioInput], sample_rate: int | None, batch_size: int, progress: bool, keep_going: bool
    ) -> tuple[Tensor, dict[int, str]]:
        if not items:
            raise InferenceError("no audio given")
        if batch_size < 1:
            raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
        dtype = model_dtype(self.model)
        out = torch.full((len(items), self.embed_dim), float("nan"))
        failures: dict[int, str] = {}
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            mel, longer = tower_input(self.frontend, self._batch([w for _, w in pending]),
                                      self.model.audio_tower.input_kind)
            out[[i for i, _ in pending]] = self.model.encode_audio(mel.to(dtype), longer).float().cpu()
            pending.clear()

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), unit="clip", desc="embedding")
        try:
            for i, item in enumerate(items):
                try:
                    pending.append((i, self.load_waveform(item, sample_rate)))
                except (InferenceError, FileNotFoundError) as e:
                    if not keep_going:
                        raise
                    failures[i] = str(e)
                if len(pending) == batch_size:
                    flush()
                if bar is not None:
                    bar.update(1)
            if pending:
                flush()
        finally:
            if bar is not None:
                bar.close()
        return out, failures

    # ------------------------------------------------------------------------------ text

    @torch.inference_mode()
    def embed_text(self, texts: str | Sequence[str], batch_size: int = 64) -> Tensor:
        """Embed captions: a string or a list -> ``(N, D)`` float32 CPU, unit rows."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InferenceError("no text given")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InferenceError(f"texts must be strings; items {bad[:5]} are not")
        return make_text_encoder(self.model, self.tokenizer, self.device, batch_size)(texts).cpu()

    @torch.inference_mode()
    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
        """``(L, D)`` prompt embeddings of ``labels`` (templates default to ``cfg.eval.templates``)."""
        templates = list(templates or self.cfg.eval.templates or DEFAULT_TEMPLATES)
        return encode_labels(lambda t: self.embed_text(t), labels, templates)

    def zero_shot(
        self,
        audio: AudioInput | Sequence[AudioInput],
        labels: Sequence[str],
        sample_rate: int | None = None,
        templates: Sequence[str] | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> Tensor:
        """Zero-shot class probabilities ``(N, L)``: softmax over labels of the temperature-scaled
        cosine similarity between each clip and ``"This is a sound of {label}."``.

        At least two labels: a softmax over one label is 1 for every clip, whatever it holds.
        """
        label_emb = self._zero_shot_labels(labels, templates)
        emb = self.embed_audio(audio, sample_rate=sample_rate, batch_size=batch_size, progress=progress)
        return self._probabilities(emb, label_emb)

    def zero_shot_files(
        self,
        files: Sequence[str | Path],
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> tuple[Tensor, dict[int, str]]:
        """:meth:`zero_shot` over audio files, carrying on past the ones that cannot be read: their
        rows are NaN and ``{index: reason}`` lists them (see :meth:`embed_audio_files`)."""
        label_emb = self._zero_shot_labels(labels, templates)
        emb, failures = self.embed_audio_files(files, batch_size=batch_size, progress=progress)
        return self._probabilities(emb, label_emb), failures

    def _zero_shot_labels(self, labels: Sequence[str], templates: Sequence[str] | None) -> Tensor:
        labels = check_labels(labels)
        if len(labels) < 2:
            raise InferenceError(
                f"zero-shot needs at least two labels, got {labels}: probabilities are a softmax over the labels, "
                "so a single label gets 1.000 for any audio. Add the alternatives it should be told apart from "
                "(e.g. dog,cat,rain), or compare embeddings (embed_audio / embed_text) by cosine similarity"
            )
        return self.label_embeddings(labels, templates)

    @torch.inference_mode()
    def _probabilities(self, emb: Tensor, label_emb: Tensor) -> Tensor:
        scale = self.model.scale().float().cpu()
        return torch.softmax(scale * emb @ label_emb.T, dim=1)


def _as_list(audio: AudioInput | Sequence[AudioInput]) -> list[AudioInput]:
    if isinstance(audio, (str, Path, np.ndarray, Tensor)):
        return [audio]
    return list(audio)


# ---------------------------------------------------------------------------------- loading


def load(path: str | Path, device: torch.device | str | None = None) -> Clap:
    """Load a model for inference.

    ``path`` may be an exported directory (``config.yaml`` + ``model.safetensors``), a trainer
    checkpoint directory ``.../checkpoints/step_XXXXXXXX`` or a run directory ``runs/<name>``: see
    :func:`clapscale.models.loading.load_trained_model`. A damaged or unrecognised path raises
    ``ModelLoadError`` naming the file; a missing one ``FileNotFoundError``.
    """
    from clapscale.models import build_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_trained_model(path)
    return Clap(model, cfg, build_tokenizer(cfg.model.text), device=device, source=str(path))
