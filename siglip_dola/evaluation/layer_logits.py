"""Per-layer log-probs of a split, computed chunk by chunk: peak memory O(n*C) per mode, not O(N*n*C).

Calibration and evaluation score many DoLa settings from one pass of embeddings. Caching every layer's
log-probs would cost (N-1) x n x C floats (23 x 50,000 x 1,000 fp32 = 4.6 GB). Instead the final layer's
log-probs [n, C] are kept, and the layers' are computed for one chunk of rows at a time: (N-1) x r x C
with r = max(n * C, CHUNK_FLOOR) / ((N-1) * C). DoLa, top-k and the JSD are per row, so the results are
those of the all-at-once computation.

Two layouts: the rows vary by layer (images against a fixed text bank: classification, image -> text)
or the columns do (texts against the images' layer-j embeddings: text -> image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from siglip_dola import scoring

CHUNK_FLOOR = 1 << 22  # elements of one chunk's layer stack at least: small splits are one chunk


@dataclass
class LayerLogits:
    """final [n, C] log-probs kept; layers 1..N-1 computed per chunk from row_layers [N-1, n, D] x columns
    [C, D], or from rows [n, D] x column_layers [N-1, C, D]. labels [n]: the target column of each row."""
    final: torch.Tensor
    labels: torch.Tensor | None
    embeddings: object
    tau: float
    row_layers: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    column_layers: torch.Tensor | None = None
    chunk_rows: int | None = None  # None: sized by CHUNK_FLOOR

    @property
    def num_layers(self) -> int:
        """N: the candidate layers are 1..N-1."""
        stack = self.row_layers if self.column_layers is None else self.column_layers
        return stack.shape[0] + 1

    def layer_log_probs(self, rows: slice) -> torch.Tensor:
        """(N-1, r, C) log-probs of layers 1..N-1 (row j-1 = layer j) for `rows`."""
        if self.column_layers is None:
            return scoring.build_log_probs_from_rep(self.row_layers[:, rows], self.columns, self.tau)
        return torch.stack([scoring.build_log_probs_from_rep(self.rows[rows], gallery, self.tau)
                            for gallery in self.column_layers])

    def chunks(self) -> list[slice]:
        """Row slices covering 0..n-1, each small enough that its layer stack is <= max(n*C, CHUNK_FLOOR)."""
        n, classes = self.final.shape
        size = self.chunk_rows or max(1, max(n * classes, CHUNK_FLOOR) // ((self.num_layers - 1) * classes))
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def iter_chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(rows, final [r, C], layers [N-1, r, C]) per chunk."""
        for rows in self.chunks():
            yield rows, self.final[rows], self.layer_log_probs(rows)


def score_point(final: torch.Tensor, layers: torch.Tensor, point) -> scoring.DoLaResult:
    """DoLa for one configuration (a DoLaSettings) from log-probs final [..., C], layers [N-1, ..., C] (row j-1 =
    layer j); a point that reads no layer (the baseline) is scored without any."""
    stacked = layers[[j - 1 for j in point.layers]] if point.layers else None  # (J, ..., C)
    return scoring.dola(final, stacked, point)


def concat_results(parts: list[scoring.DoLaResult]) -> scoring.DoLaResult:
    """One DoLaResult from per-chunk ones (rows along dim 0; jsd [J, n] along dim 1)."""
    return scoring.DoLaResult(torch.cat([p.probs for p in parts]), torch.cat([p.log_probs for p in parts]),
                              torch.cat([p.final_probs for p in parts]),
                              torch.cat([p.premature_layer for p in parts]), torch.cat([p.jsd for p in parts], dim=1))


def score_modes(cache: LayerLogits, points: dict) -> dict:
    """{mode: DoLaResult over all n rows} for {mode: grid point}: O(n*C) memory per mode."""
    parts = {mode: [] for mode in points}
    for _, final, stack in cache.iter_chunks():
        for mode, point in points.items():
            parts[mode].append(score_point(final, stack, point))
    return {mode: concat_results(results) for mode, results in parts.items()}
