"""The scale jitter's resampling on the CPU: resize by a scale, cut a window on whole pixels of the resized
image, mirror it, paste it top-left on a padded canvas -- one antialiased bilinear pass over the window.

Why torch and not DALI's CPU ``fn.resize``: the jitter was almost all of the CPU pipeline's time, and the
resampling itself decides it. One thread, 640 x 480 -> 1024 x 768 uint8: DALI's CPU resize 7.6 ms, PIL 4.2
ms, torch's uint8 channels-last kernel written straight into a channels-last buffer 0.75 ms (OpenCV
0.8 ms, without antialiasing, and a dependency this project does not otherwise need; torch is one
already). The same kernel family as PIL's (separable triangle filter widened by the downscale factor), so
it matches DALI's antialiased linear resize to rounding in the interior (``docs/pipelines.md`` states the
measured difference). The GPU pipelines keep DALI's resize.

Why exact: torch resizes the *whole* image by the given scales, one per axis (``scales_h``/``scales_w``:
output pixel i samples source (i + 0.5) / scale - 0.5, the mapping DALI's region of interest gives) and
computes only the rows and columns up to the window's far edge, so cutting the window at whole pixels of
that image is the same map as DALI's fractional ROI ``[top / scale_y, (top + height) / scale_y)`` (and
likewise in x); the polygons go through that map (``pipelines.blocks.scale_jitter``) and masks and boxes
do not depend on the resampler at all. The scales are mmdetection's per-axis ``scale_factor`` (each axis
resized to whole pixels), handed over in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Window(NamedTuple):
    """What the jitter cuts from a sample, as the pipeline hands it over (a float vector in this order):
    the source region (y0, x0) - (y1, x1), x0 > x1 when mirrored, which is also the ``height`` x ``width``
    window at (``top``, ``left``) of the stored image resized by ``scale_y`` x ``scale_x`` (whole pixels),
    mirrored if ``flip``. DALI's resize reads the first six (its arguments ``roi_end``, ``roi_start``,
    ``size``), this module the last seven. The order is the order DALI first visits the random draws behind
    them when it numbers the graph's operators, which is what seeds them (``pipelines.blocks.resample_window``)."""
    y1: float
    x1: float
    y0: float
    x0: float
    height: int
    width: int
    scale_y: float
    scale_x: float
    top: int
    left: int
    flip: bool

    @classmethod
    def from_row(cls, row) -> Window:
        y1, x1, y0, x0, h, w, sy, sx, t, l, f = (float(v) for v in row)
        return cls(y1, x1, y0, x0, int(h), int(w), sy, sx, int(t), int(l), bool(f))


def _channels_last(flat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A [1, 3, h, w] channels-last view of the front of ``flat`` (the resize kernel's fast layout)."""
    return flat[:h * w * 3].view(1, h, w, 3).permute(0, 3, 1, 2)


class Resampler:
    """Keeps one scratch buffer for the resized rows (a fresh multi-megabyte array per image would fault in
    its pages every time)."""

    def __init__(self):
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __call__(self, image: np.ndarray, win: Window, out: np.ndarray, pad_value: int = 0) -> np.ndarray:
        """``image`` [h, w, 3] uint8 -> ``out`` [S, S, 3] uint8: the window top-left, ``pad_value``
        elsewhere. The window must fit the canvas."""
        H, W = win.top + win.height, win.left + win.width
        # torch skips a dimension whose output size equals the input's, whatever the scale says: one
        # more row (column) keeps the scale's mapping there; it is not part of the window
        H += H == image.shape[0] and win.scale_y != 1.0
        W += W == image.shape[1] and win.scale_x != 1.0
        if win.height > out.shape[0] or win.width > out.shape[1] or min(win.height, win.width) < 1:
            raise ValueError(f"window {win} does not fit a {out.shape[0]} x {out.shape[1]} canvas")
        if self._scratch.numel() < H * W * 3:
            self._scratch = torch.empty(H * W * 3, dtype=torch.uint8)
        resized = _channels_last(self._scratch, H, W)
        src = torch.from_numpy(image).permute(2, 0, 1)[None]
        torch.ops.aten._upsample_bilinear2d_aa.out(src, [H, W], False, win.scale_y, win.scale_x, out=resized)
        cut = resized[0, :, win.top:win.top + win.height, win.left:win.left + win.width].permute(1, 2, 0)
        if win.flip:
            cut = cut.flip(1)
        canvas = torch.from_numpy(out)
        canvas[:win.height, :win.width].copy_(cut)
        out[win.height:] = pad_value
        out[:win.height, win.width:] = pad_value
        return out
