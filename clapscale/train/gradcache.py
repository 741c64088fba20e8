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

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_RngState = tuple[torch.Tensor, "list[torch.Tensor] | None"]


def _rng_snapshot() -> _RngState:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_replay(state: _RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def accumulated_backward(
    micro_inputs: list[Any],
    forward: Callable[[Any], Features],
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    is_finite: Callable[[torch.Tensor], bool],
) -> tuple[torch.Tensor, bool]:
    """Loss and gradient of the concatenated micro-batches, one micro-batch graph at a time.

    ``forward(inputs) -> (audio (b, D), text (b, D), scale ())``; ``loss_of(audio (A*b, D),
    text (A*b, D), scale)`` the (gathering) loss; ``backward(surrogate)`` runs once per
    micro-batch (the engine's backward + step). The parameter gradient summed over the
    ``backward`` calls equals that of ``loss_of`` on the concatenation: the surrogate
    ``<a_m, dL/da_m> + <t_m, dL/dt_m> + s * dL/ds / A`` has exactly that gradient.
    Returns ``(loss, finite)``; when not finite, nothing is back-propagated.
    """
    states, audio, text, scale = [], [], [], None
    with torch.no_grad():
        for inputs in micro_inputs:
            states.append(_rng_snapshot())
            a, t, scale = forward(inputs)
            audio.append(a.float())
            text.append(t.float())
    after = _rng_snapshot()
    all_audio = torch.cat(audio).requires_grad_(True)
    all_text = torch.cat(text).requires_grad_(True)
    leaf_scale = scale.detach().float().requires_grad_(True)
    loss = loss_of(all_audio, all_text, leaf_scale)
    if not is_finite(loss):
        return loss.detach(), False
    loss.backward()
    sizes = [a.shape[0] for a in audio]
    grad_audio = all_audio.grad.split(sizes)
    grad_text = all_text.grad.split(sizes)
    grad_scale = leaf_scale.grad / len(micro_inputs)
    for m, inputs in enumerate(micro_inputs):
        _rng_replay(states[m])
        a, t, s = forward(inputs)
        surrogate = (
            (a.float() * grad_audio[m]).sum() + (t.float() * grad_text[m]).sum() + (s.float() * grad_scale).sum()
        )
        backward(surrogate)
    _rng_replay(after)
    return loss.detach(), True
