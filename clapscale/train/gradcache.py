"""Gradient accumulation that keeps every global negative (the GradCache algorithm).

With ``train.grad_accum = A`` the loss is the loss of the whole accumulated global batch
(A x b x world rows), not the mean of A smaller contrastive losses: a micro-batch's rows are
scored against the other micro-batches' columns too. Holding A graphs at once would cost A times
the activation memory, so ``accumulated_backward``

1. embeds the A micro-batches without a graph,
2. computes the loss and its gradient with respect to the cached embeddings,
3. re-runs each micro-batch with a graph and back-propagates the cached gradient into it.

The RNG state of each micro-batch is replayed so the re-run sees the same dropout masks; the
generator ends where a single pass would have left it. Cost: one extra forward per micro-batch.
Under this scheme BatchNorm running statistics are updated twice per micro-batch (the cached and
the re-run forward).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# One micro-batch's forward: per-row features ({name: (b, D)}) and scalars ({name: ()}, the same
# parameters in every micro-batch, e.g. temperatures).
Rows = dict[str, torch.Tensor]
Scalars = dict[str, torch.Tensor]
_RngState = tuple[torch.Tensor, "list[torch.Tensor] | None"]


def _rng_snapshot() -> _RngState:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_replay(state: _RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def accumulated_backward(
    micro_inputs: list[Any],
    forward: Callable[[Any], tuple[Rows, Scalars]],
    loss_of: Callable[[Rows, Scalars], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    is_finite: Callable[[torch.Tensor], bool],
    frozen: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, bool]:
    """Loss and gradient of the concatenated micro-batches, one micro-batch graph at a time.

    ``forward(inputs) -> (rows, scalars)``: CLAP's ``{"audio", "text"}`` and ``{"scale"}``, or the
    pairwise loss's modalities and per-pair temperatures; ``loss_of(rows, scalars)`` the (gathering)
    loss of the rows of all micro-batches concatenated (same keys); ``backward(surrogate)`` runs once
    per micro-batch (the engine's backward + step). The parameter gradient summed over the
    ``backward`` calls equals that of ``loss_of`` on the concatenation: the surrogate
    ``sum_k <r_k, dL/dr_k> + sum_j s_j * dL/ds_j / A`` has exactly that gradient. Rows named in
    ``frozen`` (no trainable parameter feeds them: VIP-ANT's frozen pivot towers) enter the loss as
    constants, so the loss neither differentiates nor gathers them with a gradient; they are still
    recomputed with the rest of each micro-batch (one forward call yields every modality), which
    costs the frozen towers a second forward. Returns ``(loss, finite)``; when not finite, nothing
    is back-propagated.
    """
    states: list[_RngState] = []
    rows: dict[str, list[torch.Tensor]] = {}
    scalars: Scalars = {}
    with torch.no_grad():
        for inputs in micro_inputs:
            states.append(_rng_snapshot())
            r, scalars = forward(inputs)
            for k, v in r.items():
                rows.setdefault(k, []).append(v.float())
    after = _rng_snapshot()
    all_rows = {k: torch.cat(v).requires_grad_(k not in frozen) for k, v in rows.items()}
    leaf_scalars = {k: v.detach().float().requires_grad_(True) for k, v in scalars.items()}
    loss = loss_of(all_rows, leaf_scalars)
    if not is_finite(loss):
        return loss.detach(), False
    loss.backward()
    sizes = [v.shape[0] for v in next(iter(rows.values()))]
    grad_rows = {k: (v.grad.split(sizes) if v.grad is not None else None) for k, v in all_rows.items()}
    grad_scalars = {k: (v.grad / len(micro_inputs) if v.grad is not None else None) for k, v in leaf_scalars.items()}
    for m, inputs in enumerate(micro_inputs):
        _rng_replay(states[m])
        r, s = forward(inputs)
        wrongly_frozen = sorted(k for k in frozen if k in r and r[k].requires_grad)
        if wrongly_frozen:  # its gradient would be dropped without a word
            raise ValueError(f"rows {wrongly_frozen} were declared frozen but a trainable parameter feeds them")
        surrogate = sum((r[k].float() * g[m]).sum() for k, g in grad_rows.items() if g is not None)
        surrogate = surrogate + sum((s[k].float() * g).sum() for k, g in grad_scalars.items() if g is not None)
        backward(surrogate)
    _rng_replay(after)
    return loss.detach(), True
