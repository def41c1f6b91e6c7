"""Exact (flat) L2 search in torch: the GPU search where FAISS has no GPU build.

:class:`TorchFlatIndex` answers ``search(queries, k)`` as ``faiss.IndexFlatL2``
does, so :func:`ptsne.knn.search` (self exclusion, batching, the contract of a
:class:`ptsne.knn.KNNGraph`) serves both: squared Euclidean distances (float32
``(m, k)``, ascending) and int64 ids, equal distances in the order of their ids,
id ``-1`` and distance ``inf`` where fewer than ``k`` points are indexed.

Distances are computed as FAISS's BLAS path does for a batch of queries,
``|x|^2 + |y|^2 - 2 x.y`` clamped at 0, tile by tile (a matrix product of a
block of queries against a block of the data, then ``topk``), so memory stays
bounded by :data:`TILE_BYTES` however large the data. The product runs in IEEE
float32 (never TF32: :func:`ptsne.device.matmul_precision`), so the neighbours
are the exact ones, not an approximation.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from ptsne.device import matmul_precision

log = logging.getLogger(__name__)

#: Bytes of one tile of distances (float32 queries x data points); a few hundred MB keeps a GPU busy.
TILE_BYTES = 256 << 20
#: Queries per tile at most: the data side of a tile is TILE_BYTES / (4 * this) points or more.
QUERY_TILE = 4096


class TorchFlatIndex:
    """An exact L2 index whose vectors live on a torch device (``"cuda"``, ``"cuda:N"`` or ``"cpu"``).

    Parameters
    ----------
    d : int
        Dimension of the vectors.
    device : str or torch.device
        Where the vectors are kept and searched.
    tile_bytes : int
        Size of one tile of distances (see :data:`TILE_BYTES`).
    """

    def __init__(self, d: int, device: str | torch.device = "cuda", tile_bytes: int = TILE_BYTES):
        if int(d) < 1:
            raise ValueError(f"TorchFlatIndex: d must be >= 1, got {d!r}")
        if int(tile_bytes) < 4:
            raise ValueError(f"TorchFlatIndex: tile_bytes must be >= 4, got {tile_bytes!r}")
        self.d = int(d)
        self.device = torch.device(device)
        self.tile_bytes = int(tile_bytes)
        self.is_trained = True
        self._data = torch.empty((0, self.d), dtype=torch.float32, device=self.device)
        self._norms = torch.empty((0,), dtype=torch.float32, device=self.device)

    @property
    def ntotal(self) -> int:
        return int(self._data.shape[0])

    def train(self, x: np.ndarray) -> None:
        """Nothing to train (as ``IndexFlatL2``)."""

    def reset(self) -> None:
        """Drop every indexed vector (the device memory is released to torch's allocator)."""
        self._data = self._data[:0]
        self._norms = self._norms[:0]

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        """Append the rows of ``x`` (float32 ``(n, d)``); their ids follow the ones already indexed."""
        x = self._as_tensor(x, "x")
        self._data = torch.cat([self._data, x])
        self._norms = torch.cat([self._norms, (x * x).sum(1)])

    def search(self, x: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed vectors of each row of ``x``.

        Returns
        -------
        distances : ndarray, float32 (m, k)
            Squared Euclidean distances, ascending; ``inf`` where fewer than ``k`` points are indexed.
        ids : ndarray, int64 (m, k)
            Positions in the index; among equal distances the lower id first; ``-1`` for missing points.
        """
        if int(k) < 1:
            raise ValueError(f"TorchFlatIndex.search: k must be >= 1, got {k!r}")
        q = self._as_tensor(x, "x")
        m, k = q.shape[0], int(k)
        out_d = np.full((m, k), np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        if m == 0 or self.ntotal == 0:
            return out_d, out_i
        rows = min(QUERY_TILE, m)
        cols = max(k, self.tile_bytes // (4 * rows))
        kk = min(k, self.ntotal)
        # IEEE float32 products on a GPU (TF32 would round the distances); CPU products are IEEE anyway.
        exact = matmul_precision(tf32=False) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), exact:
            for start in range(0, m, rows):
                d2, ids = self._search_tile(q[start:start + rows], kk, cols)
                out_d[start:start + rows, :kk] = d2.cpu().numpy()
                out_i[start:start + rows, :kk] = ids.cpu().numpy()
        return out_d, out_i

    def _search_tile(self, q: torch.Tensor, k: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        qn = (q * q).sum(1, keepdim=True)
        best_d = best_i = None
        for s in range(0, self.ntotal, cols):
            y = self._data[s:s + cols]
            d2 = (qn + self._norms[s:s + cols][None, :]).sub_(2.0 * (q @ y.T)).clamp_min_(0.0)
            vals, ids = smallest_by_id(d2, min(k, y.shape[0]))
            ids += s
            if best_d is None:
                best_d, best_i = vals, ids
                continue
            # Both parts ordered by (distance, id) and every earlier id is lower: a stable
            # sort by distance keeps equal distances in id order.
            vals, ids = torch.cat([best_d, vals], 1), torch.cat([best_i, ids], 1)
            order = torch.sort(vals, dim=1, stable=True).indices[:, :k]
            best_d, best_i = vals.gather(1, order), ids.gather(1, order)
        return best_d, best_i

    def _as_tensor(self, x, name: str) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32) if not torch.is_tensor(x) else x)
        if t.ndim != 2 or t.shape[1] != self.d:
            raise ValueError(f"TorchFlatIndex: {name} must have shape (n, {self.d}), got {tuple(t.shape)}")
        return t.to(device=self.device, dtype=torch.float32)


def smallest_by_id(d2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row of ``d2`` (``(m, n)``), ordered by (value, column).

    ``torch.topk`` picks any of several equal values at the boundary; FAISS keeps
    the lower ids. Rows with such a tie are selected again: every value below the
    k-th, then the lowest columns holding the k-th value.
    """
    vals, ids = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    tied = ((d2 <= kth).sum(1) > k).nonzero().flatten()
    if tied.numel():
        sub, t = d2[tied], kth[tied]
        less, equal = sub < t, sub == t
        need = k - less.sum(1, keepdim=True)
        keep = less | (equal & (equal.cumsum(1) <= need))
        cols = keep.nonzero()[:, 1].view(-1, k)  # row-major: columns ascending
        ids[tied] = cols
        vals[tied] = sub.gather(1, cols)
    # Equal values inside the selection: by column, then stably by value.
    by_id = torch.argsort(ids, dim=1)
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, order), ids.gather(1, order)
