"""Chunked cosine top-k: N queries x M keys without the N x M matrix.

Queries and keys are L2-normalised rows, so the dot product is the cosine. The keys are scored in
column chunks and a running top-k per query row is merged after each chunk, so memory is
O(rows x (k + cols)) whatever M is; rows are chunked too. The values do not depend on the chunk
sizes; among keys tied exactly at the k-th value, which one is returned may.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.inference_mode()
def topk_cosine(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    device: torch.device | str = "cpu",
    row_chunk: int = 4096,
    col_chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar keys of every query.

    Args:
        queries: (N, D) L2-normalised.
        keys: (M, D) L2-normalised (kept where it is; each column chunk is moved to ``device``).
        k: neighbours per query; ``min(k, M)`` are returned.

    Returns:
        values (N, k') float32 cosines, descending; indices (N, k') int64 into ``keys``; on the CPU.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (N, D) and (M, D)")
    n, m = queries.shape[0], keys.shape[0]
    k = min(k, m)
    out_v = torch.empty(n, k, dtype=torch.float32)
    out_i = torch.empty(n, k, dtype=torch.int64)
    if n == 0 or k == 0:
        return out_v[:, :0] if k == 0 else out_v, out_i[:, :0] if k == 0 else out_i
    for r0 in range(0, n, row_chunk):
        q = queries[r0 : r0 + row_chunk].to(device, torch.float32)
        best_v = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=device)
        for c0 in range(0, m, col_chunk):
            sims = q @ keys[c0 : c0 + col_chunk].to(device, torch.float32).T
            kk = min(k, sims.shape[1])
            v, i = torch.topk(sims, kk, dim=1, sorted=True)
            # Running best first, then this chunk: a stable sort keeps the earlier (smaller) index on ties.
            cand_v = torch.cat([best_v, v], dim=1)
            cand_i = torch.cat([best_i, i + c0], dim=1)
            order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cand_v.gather(1, order), cand_i.gather(1, order)
        out_v[r0 : r0 + q.shape[0]] = best_v.cpu()
        out_i[r0 : r0 + q.shape[0]] = best_i.cpu()
    return out_v, out_i
