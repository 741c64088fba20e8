"""Contrastive losses over features gathered across data-parallel ranks.

Every loss is a plain ``nn.Module`` with ``rank`` and ``world_size`` injected at construction,
so it runs (and is tested) without a process group when ``world_size == 1``.

Normalisation convention: with ``local_loss=True`` rank r returns the mean loss of *its* rows
(b audio rows and b text rows, each scored against all N = b * world_size columns). The mean of
these per-rank losses is the single-process loss over the global batch, and because the gather
carries gradient back to the rank that owns each feature, averaging the gradients across ranks
(what DeepSpeed / DDP do) gives exactly the single-process gradient. ``tests/test_losses_dist.py``
checks this with two gloo processes.

Per-rank batches must all have the same size b (the loaders drop the last partial batch):
``all_gather`` needs equal shapes and the labels are ``arange(b) + b * rank``.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


_all_gather_warning_silenced = False


def _silence_all_gather_deprecation() -> None:
    """Register, once per process, a filter for torch's deprecation notice of the autograd all_gather.

    torch marks ``torch.distributed.nn.functional.all_gather`` deprecated in favour of the private
    ``torch.distributed._functional_collectives``; it is the call whose backward returns each rank's
    gradient to the feature's owner (tests/test_losses_dist.py checks it against one process), so we
    keep it and silence that one notice, which every rank would print. One filter registered on first
    use, not a ``catch_warnings`` per forward: that context swaps the process-global filter list
    (unsafe while loader threads warn) and, by invalidating every "once per location" record,
    re-prints the process's other warnings after each step. Not at import time: importing the
    losses changes no global state.
    """
    global _all_gather_warning_silenced
    if not _all_gather_warning_silenced:
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
        _all_gather_warning_silenced = True


def gather_features(x: torch.Tensor, rank: int, world_size: int, with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's ``x`` (b, D) into (b * world_size, D), rank order.

    ``with_grad=True`` uses ``torch.distributed.nn.functional.all_gather``, whose backward sums
    the gradient that every rank computes for a feature back onto the rank that produced it.
    ``with_grad=False`` gathers detached copies and puts the local, gradient-carrying slice back
    in place: other ranks' features are constants here.
    """
    if world_size == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        _silence_all_gather_deprecation()
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _check_pair(audio: torch.Tensor, text: torch.Tensor) -> None:
    if audio.dim() != 2 or audio.shape != text.shape:
        raise ValueError(
            f"audio and text features must both be (B, D) with the same shape, got "
            f"{tuple(audio.shape)} and {tuple(text.shape)}"
        )


class _GatheredContrastive(nn.Module):
    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if local_loss and not gather_with_grad and world_size > 1:
            raise ValueError(
                "local_loss=True with gather_with_grad=False trains with a silently wrong gradient "
                "(no rank back-propagates into the other ranks' features): use gather_with_grad=True"
            )
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and not self.gather_with_grad:
            # Every rank computes the full loss but only back-propagates through its own slice;
            # scaling that slice's gradient by world_size makes the cross-rank mean exact.
            x = _ScaleGrad.apply(x, float(self.world_size))
        return gather_features(x, self.rank, self.world_size, self.gather_with_grad)

    def _rows(self, b: int, device: torch.device) -> torch.Tensor:
        """Global indices of the rows this rank scores: its own b samples, or all N."""
        if self.local_loss:
            return torch.arange(b, device=device) + b * self.rank
        return torch.arange(b * self.world_size, device=device)

    def _logits(
        self,
        audio: torch.Tensor,
        text: torch.Tensor,
        all_audio: torch.Tensor,
        all_text: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio->text, text->audio) logits of the rows ``_rows`` names against all N columns:
        (b, N) each with ``local_loss``, else (N, N)."""
        if self.local_loss:
            return logit_scale * audio @ all_text.T, logit_scale * text @ all_audio.T
        logits_a2t = logit_scale * all_audio @ all_text.T
        return logits_a2t, logits_a2t.T


class ClipLoss(_GatheredContrastive):
    """Symmetric InfoNCE (CLIP / CLAP loss) over features gathered from all ranks.

    ``forward(audio (b, D), text (b, D), logit_scale ()) -> loss ()``. Features are expected
    L2-normalised; ``logit_scale`` is the (already exponentiated and clamped) multiplier.
    Memory per rank is O(b x N) with ``local_loss`` and O(N^2) without.
    """

    def forward(
        self, audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        _check_pair(audio, text)
        b = audio.shape[0]
        all_audio = self._gather(audio)
        all_text = self._gather(text)
        rows = self._rows(b, audio.device)
        logits_a2t, logits_t2a = self._logits(audio, text, all_audio, all_text, logit_scale)
        return 0.5 * (F.cross_entropy(logits_a2t, rows) + F.cross_entropy(logits_t2a, rows))


class SoftLabelClipLoss(_GatheredContrastive):
    """Soft-labelled contrastive loss with a frozen teacher (papers/clap-unsupervised-curation-soft-labels.txt).

    For row i the audio->text target is ``(1 - beta) * onehot(i) + beta * S_a[i]`` and the
    text->audio target ``(1 - beta) * onehot(i) + beta * S_t[i]`` (eqs. 3-4), where S_a / S_t are the
    teacher's intra-modal similarities. The paper's C~ = a~ a~^T rows are cosines, not
    distributions; KL needs a distribution, so each row becomes ``softmax(cosines / temperature)``.
    The temperature is the targets' own (``loss.soft_label_temperature``), not the teacher's learned
    one: a trained teacher's scale sits at its clamp (~100), where a neighbour at cosine 0.9 gets
    weight e^-10 against the sample's own cosine 1, so the soft part collapses onto the diagonal
    and the loss is InfoNCE again. The loss is the mean row KL(target || softmax(student logits))
    of the two directions (eq. 5), averaged. ``beta = 0`` reduces it to ``ClipLoss`` exactly (the
    entropy of a one-hot target is zero).

    ``forward(audio, text, logit_scale, teacher_audio, teacher_text)``; all features (b, D) and
    L2-normalised; teacher features carry no gradient.
    """

    def __init__(self, beta: float = 0.3, temperature: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"soft-label beta must be in [0, 1], got {beta}")
        if not temperature > 0.0:
            raise ValueError(f"soft-label temperature must be > 0, got {temperature}")
        self.beta = beta
        self.temperature = temperature

    def forward(
        self,
        audio: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        teacher_audio: torch.Tensor,
        teacher_text: torch.Tensor,
    ) -> torch.Tensor:
        _check_pair(audio, text)
        _check_pair(teacher_audio, teacher_text)
        if teacher_audio.shape[0] != audio.shape[0]:
            raise ValueError(
                f"teacher batch {teacher_audio.shape[0]} != student batch {audio.shape[0]}"
            )
        b = audio.shape[0]
        rows = self._rows(b, audio.device)
        all_audio = self._gather(audio)
        all_text = self._gather(text)
        with torch.no_grad():
            t_audio = gather_features(teacher_audio.detach(), self.rank, self.world_size, False)
            t_text = gather_features(teacher_text.detach(), self.rank, self.world_size, False)
            target_a2t = self.targets(t_audio[rows] @ t_audio.T, rows)
            target_t2a = self.targets(t_text[rows] @ t_text.T, rows)
        logits_a2t, logits_t2a = self._logits(audio, text, all_audio, all_text, logit_scale)
        return 0.5 * (_row_kl(target_a2t, logits_a2t) + _row_kl(target_t2a, logits_t2a))

    def targets(self, similarity: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Target distributions (R, N) from teacher cosines ``similarity`` (R, N); ``rows`` (R,)
        are the global indices of the rows (where the hard label sits)."""
        soft = torch.softmax(similarity.float() / self.temperature, dim=-1)
        hard = F.one_hot(rows, similarity.shape[1]).to(soft.dtype)
        return (1.0 - self.beta) * hard + self.beta * soft


class DuplicateAwareClipLoss(_GatheredContrastive):
    """Symmetric InfoNCE whose targets count every sample of the same group as a positive.

    Captions taken from paths or templates repeat ("wolf hit" for four recordings, "The sound of
    dog" for every dog): plain InfoNCE makes the identical captions in a batch negatives of each
    other and pushes apart clips the data calls the same. Here row i's target is uniform over the
    columns j with ``group_j == group_i`` (itself included): ``target = same / same.sum(1)``, and
    the loss is the soft-target cross-entropy of both directions, averaged. Groups are integer
    ids of a caption (or a tag set), gathered from every rank like the features. With all
    groups distinct this is ``ClipLoss`` exactly.

    ``forward(audio (b, D), text (b, D), logit_scale (), groups (b,) int64) -> loss ()``.
    """

    def forward(
        self, audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        _check_pair(audio, text)
        b = audio.shape[0]
        if groups.shape != (b,):
            raise ValueError(f"groups must be ({b},), one id per sample, got {tuple(groups.shape)}")
        groups = groups.to(device=audio.device, dtype=torch.long)
        all_groups = gather_features(groups[:, None], self.rank, self.world_size, False)[:, 0]
        rows = self._rows(b, audio.device)
        same = (all_groups[rows, None] == all_groups[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        logits_a2t, logits_t2a = self._logits(audio, text, self._gather(audio), self._gather(text), logit_scale)
        return 0.5 * (_soft_cross_entropy(target, logits_a2t) + _soft_cross_entropy(target, logits_t2a))


MODALITIES = ("audio", "image", "text")


def pair_name(first: str, second: str) -> str:
    """Canonical name of a modality pair, in ``MODALITIES`` order: ``pair_name("text", "audio") ==
    "audio-text"``. Unknown modalities or a modality paired with itself raise ``ValueError``."""
    for m in (first, second):
        if m not in MODALITIES:
            raise ValueError(f"modality {m!r} is not one of {', '.join(MODALITIES)}")
    if first == second:
        raise ValueError(f"a contrastive pair needs two different modalities, got {first!r} twice")
    a, b = sorted((first, second), key=MODALITIES.index)
    return f"{a}-{b}"


class PairwiseInfoNCE(_GatheredContrastive):
    """Weighted sum of symmetric InfoNCE losses over pairs of modalities (audio, image, text).

    ``pairs`` maps a pair name (``"audio-text"``, ``"audio-image"``, ``"image-text"``, either order) to
    its weight; the loss is ``sum_p w_p * InfoNCE_p`` (a sum, not a mean: with unit weights each pair
    counts as a whole CLAP loss). All three pairs is AudioCLIP's tri-modal loss
    (papers/audioclip.txt, sec. 3.3); ``{"audio-image", "image-text"}`` with the image and text
    towers frozen is VIP-ANT's bi-bi-modal loss (the image-text term then has no gradient and only
    reports the pivot's own alignment; VIP-ANT trains L(V,A)); ``{"audio-text": 1}`` is ``ClipLoss``.

    Each modality is gathered once, whatever the number of pairs it takes part in. A modality whose
    features carry no gradient (a frozen tower) is gathered without it. Every pair's term follows
    ``ClipLoss``'s convention (local rows against all gathered columns), so averaging per-rank
    losses and gradients gives the single-process ones (tests/test_losses_trimodal.py).

    ``forward(features {modality: (b, D)}, logit_scale) -> loss ()``; ``logit_scale`` is one 0-d
    multiplier for every pair, or a dict ``{pair name: 0-d}`` (AudioCLIP learns one per pair).
    ``last_terms`` holds the detached per-pair losses of the latest forward, for logging.
    """

    def __init__(self, pairs: dict[str, float], **kwargs) -> None:
        super().__init__(**kwargs)
        if not pairs:
            raise ValueError("pairwise InfoNCE needs at least one modality pair")
        self.pairs: dict[str, float] = {}
        for name, weight in pairs.items():
            parts = name.split("-")
            if len(parts) != 2:
                raise ValueError(f"pair {name!r} must name two modalities as 'first-second', e.g. 'audio-text'")
            canonical = pair_name(*parts)
            if canonical in self.pairs:
                raise ValueError(f"pair {name!r} is given twice (as {canonical!r})")
            if not weight >= 0.0:
                raise ValueError(f"weight of pair {name!r} must be >= 0, got {weight}")
            self.pairs[canonical] = float(weight)
        self.modalities = tuple(m for m in MODALITIES if any(m in p.split("-") for p in self.pairs))
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(
        self, features: dict[str, torch.Tensor], logit_scale: torch.Tensor | dict[str, torch.Tensor]
    ) -> torch.Tensor:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(
                f"pairs {', '.join(self.pairs)} need {', '.join(self.modalities)} features; "
                f"missing {', '.join(missing)}"
            )
        ref = features[self.modalities[0]]
        for m in self.modalities:
            _check_pair(ref, features[m])
        b = ref.shape[0]
        gathered = {m: self._gather_modality(features[m]) for m in self.modalities}
        rows = self._rows(b, ref.device)
        total = ref.new_zeros(())
        self.last_terms = {}
        for name, weight in self.pairs.items():
            first, second = name.split("-")
            scale = logit_scale[name] if isinstance(logit_scale, dict) else logit_scale
            logits_12, logits_21 = self._logits(
                features[first], features[second], gathered[first], gathered[second], scale
            )
            term = 0.5 * (F.cross_entropy(logits_12, rows) + F.cross_entropy(logits_21, rows))
            self.last_terms[name] = term.detach()
            total = total + weight * term
        return total

    def _gather_modality(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            # A frozen tower: the columns are constants; a plain gather moves no gradient bookkeeping.
            return gather_features(x, self.rank, self.world_size, with_grad=False)
        return self._gather(x)


def caption_groups(captions: list[str]) -> torch.Tensor:
    """(b,) int64 group ids of captions for ``DuplicateAwareClipLoss``: equal after lower-casing
    and collapsing whitespace <=> equal id. A keyed hash, so every rank gives the same text the
    same id without exchanging strings (a collision of two different captions, p ~ b^2 / 2^64, would
    make them positives of each other)."""
    ids = []
    for text in captions:
        norm = " ".join(text.lower().split()).encode("utf-8")
        ids.append(int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "big", signed=True))
    return torch.tensor(ids, dtype=torch.long)


def _soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j target_ij log softmax(logits_i)_j."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def _row_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target_row || softmax(logits_row)); target rows sum to 1."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = torch.xlogy(target, target) - target * log_q
    return kl.sum(dim=-1).mean()


def build_loss(cfg_loss, rank: int = 0, world_size: int = 1) -> nn.Module:
    """The loss named by ``cfg.loss`` (``clapscale.config.LossConfig``) for this rank."""
    common = dict(
        rank=rank,
        world_size=world_size,
        local_loss=cfg_loss.local_loss,
        gather_with_grad=cfg_loss.gather_with_grad,
    )
    if cfg_loss.kind == "infonce":
        return ClipLoss(**common)
    if cfg_loss.kind == "duplicate_aware":
        return DuplicateAwareClipLoss(**common)
    if cfg_loss.kind == "soft_label":
        return SoftLabelClipLoss(
            beta=cfg_loss.soft_label_beta, temperature=cfg_loss.soft_label_temperature, **common
        )
    if cfg_loss.kind == "pairwise":
        return PairwiseInfoNCE(cfg_loss.pair_weights(), **common)
    raise ValueError(
        f"loss.kind={cfg_loss.kind!r} is not one of 'infonce', 'duplicate_aware', 'soft_label', 'pairwise'"
    )
