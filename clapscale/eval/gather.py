"""Collectives for distributed evaluation: every rank runs them, every rank gets the same answer.

Evaluation under ZeRO-3 must run the model's forward on *every* rank the same number of times
(each forward all-gathers partitioned parameters), and a rank-0-only evaluation hangs. So the
evaluation loop (1) keeps all ranks stepping together until every rank's loader is exhausted
(``lockstep``), feeding a throw-away batch to ranks that ran dry, and (2) gathers the per-rank
results, which may differ in length, into the same full set on every rank (``gather_rows``,
``gather_objects``). An error on one rank inside the lockstep loop reaches every rank at the next
step (``Lockstep.guard``), so no rank is left waiting in a collective the failed rank never joins.
With ``world_size == 1`` nothing touches ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def _check_group(world_size: int) -> None:
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass world_size=1)"
        )
    if world_size > 1 and dist.get_world_size() != world_size:
        raise RuntimeError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")


class RankFailedError(RuntimeError):
    """Another rank failed inside a ``Lockstep`` loop; raised on the ranks that did not fail."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed during distributed evaluation ({detail}); this rank stops too")
        self.rank = rank
        self.detail = detail


class Lockstep(Generic[T]):
    """Steps every rank together over its own items; see ``lockstep``.

    A failure on one rank must not leave the others waiting in the next collective. The loop body
    runs under ``with steps.guard():``, which (with ``world_size > 1``) holds back an exception
    instead of raising it; the next step's all-reduce carries one "failed" flag per rank next to
    the "has an item" flag (the same single collective per step), and then every rank raises
    together: the failing rank its own exception, the others ``RankFailedError`` naming it. An
    exception from ``items`` itself (the loader) is treated the same way.
    """

    def __init__(self, items: Iterable[T], world_size: int, device: torch.device | str = "cpu"):
        _check_group(world_size)
        self.items = items
        self.world_size = world_size
        self.device = device
        self._error: BaseException | None = None

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Hold back an ``Exception`` of this step's body until every rank knows of it."""
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised after the next all-reduce
            if self._error is None:
                self._error = e

    def __iter__(self) -> Iterator[T | None]:
        it = iter(self.items)
        while True:
            item = None
            if self._error is None:
                if self.world_size == 1:
                    item = next(it, None)
                else:
                    try:
                        item = next(it, None)
                    except Exception as e:  # noqa: BLE001 - re-raised after the all-reduce
                        self._error = e
            if self.world_size > 1:
                # [has an item, failed on rank 0, ..., failed on rank W-1]: one all-reduce per step.
                flags = torch.zeros(1 + self.world_size, dtype=torch.int64, device=self.device)
                flags[0] = int(item is not None)
                flags[1 + dist.get_rank()] = int(self._error is not None)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                failed = [r for r in range(self.world_size) if int(flags[1 + r].item())]
                if failed:
                    self._raise(failed)
                if int(flags[0].item()) == 0:
                    return
            elif item is None:
                return
            yield item

    def _raise(self, failed: list[int]) -> None:
        # The error path only: one more collective so every rank can say what went wrong where.
        mine = self._error
        details = gather_objects(None if mine is None else f"{type(mine).__name__}: {mine}", self.world_size)
        if mine is not None:
            raise mine
        first = failed[0]
        raise RankFailedError(first, details[first] or "unknown error")


def lockstep(items: Iterable[T], world_size: int, device: torch.device | str = "cpu") -> Lockstep[T]:
    """Yield this rank's items, then ``None`` until every rank has run out.

    All ranks see the same number of steps; a ``None`` step means "run a dummy forward so the
    collectives inside the model line up, and discard it". Wrap the loop body in
    ``with steps.guard():`` (``steps`` being the returned ``Lockstep``) so that an error on one rank
    is raised on every rank at the next step instead of leaving the others hanging.
    """
    return Lockstep(items, world_size, device)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Picklable ``obj`` from every rank -> list ordered by rank (the same list on every rank)."""
    _check_group(world_size)
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: Tensor, world_size: int) -> Tensor:
    """Concatenate ``x`` (n_rank, *rest) from all ranks in rank order -> (sum n_rank, *rest).

    Ranks may hold different row counts (including zero): rows are padded to the largest count for
    the fixed-size ``all_gather`` and the padding is dropped afterwards. ``x`` stays on its device
    (CPU under gloo, CUDA under NCCL).
    """
    _check_group(world_size)
    if world_size == 1:
        return x
    counts = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def default_device(arg: str | None) -> str:
    """``--device`` as given, else ``cuda`` when there is one, else ``cpu``."""
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def command_ranks(device_arg: str | None) -> Iterator[tuple[int, int, str]]:
    """``(rank, world_size, device)`` of a command run plainly or under torchrun (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), as ``clapscale eval``, ``curate`` and ``k2c`` run: with more than
    one rank the process group (nccl on CUDA, each rank on its ``cuda:LOCAL_RANK``; gloo otherwise)
    is up inside the block and destroyed after it, whatever the block raises."""
    import os

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(device_arg)
    if world_size > 1:
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield rank, world_size, device
    finally:
        if world_size > 1:
            dist.destroy_process_group()
