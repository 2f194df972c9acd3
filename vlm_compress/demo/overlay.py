"""Which patches a method kept, drawn over the image (the demo's overlays).

:func:`token_states` maps an image's kept token indices (and, for merging methods, where the others went) onto
each grid of its :class:`~vlm_compress.adapters.base.TokenLayout`: one grid for LLaVA-1.5, the thumbnail and the
unpadded high-resolution grid for LLaVA-NeXT. :func:`render_overlay` paints them over the image, one panel per
grid: kept patches as they are, merged ones tinted blue, dropped ones darkened.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..adapters.base import TokenLayout

DROPPED, KEPT, MERGED = 0, 1, 2
MERGED_TINT = np.array([40, 110, 255], np.float32)


def token_states(layout: TokenLayout, kept_index: torch.Tensor, merged_into: torch.Tensor | None = None
                 ) -> dict[int, np.ndarray]:
    """``{partition: [rows, cols] uint8}`` with :data:`KEPT`, :data:`MERGED` (folded into a kept token) or
    :data:`DROPPED` per grid cell. ``kept_index`` [k]: token indices into the layout; ``merged_into`` [N]: per
    token the output slot it went to (-1: dropped), as :class:`~vlm_compress.pruners.base.EncoderSelection` holds."""
    n = layout.num_tokens
    kept_index = torch.as_tensor(kept_index, dtype=torch.long).cpu()
    if kept_index.numel() and (kept_index.min() < 0 or kept_index.max() >= n):
        low, high = int(kept_index.min()), int(kept_index.max())
        raise ValueError(f"kept indices must lie in [0, {n}) for this layout, got {low}..{high}")
    state = torch.full((n,), DROPPED, dtype=torch.uint8)
    if merged_into is not None:
        state[torch.as_tensor(merged_into).cpu() >= 0] = MERGED
    state[kept_index] = KEPT
    out = {}
    for partition, (rows, cols) in sorted(layout.grids.items()):
        grid = np.zeros((rows, cols), np.uint8)
        tokens = (layout.partition == partition).nonzero().squeeze(1)
        cells = layout.cell[tokens]
        grid[cells[:, 0].numpy(), cells[:, 1].numpy()] = state[tokens].numpy()
        out[partition] = grid
    return out


def _panel(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    rows = (np.arange(h) * grid.shape[0]) // h
    cols = (np.arange(w) * grid.shape[1]) // w
    cell = grid[rows[:, None], cols[None, :]]  # nearest grid cell of every pixel
    out = image.astype(np.float32)
    out[cell == DROPPED] *= 0.25
    merged = cell == MERGED
    out[merged] = 0.5 * out[merged] + 0.5 * MERGED_TINT
    edges = (np.diff(rows, prepend=-1) != 0)[:, None] | (np.diff(cols, prepend=-1) != 0)[None, :]
    out[edges & (cell == KEPT)] = 0.6 * out[edges & (cell == KEPT)] + 0.4 * 255  # light grid on kept cells
    return out.clip(0, 255).astype(np.uint8)


def render_overlay(image: Image.Image, states: dict[int, np.ndarray], gap: int = 6, min_side: int = 384) -> Image.Image:
    """One panel per grid (partition order), side by side: the image (enlarged to ``min_side`` when smaller) with
    each cell's state painted over it."""
    scale = max(1, -(-min_side // max(image.size)))
    if scale > 1:
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    rgb = np.asarray(image.convert("RGB"))
    panels = [_panel(rgb, grid) for _, grid in sorted(states.items())]
    spacer = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
    joined = [p for panel in panels for p in (panel, spacer)][:-1]
    return Image.fromarray(np.concatenate(joined, axis=1))
