"""The pixel input of MA-AGIQA: RGB, 224×224 bicubic without antialiasing, uint8.

The official code resizes with OpenCV ``INTER_CUBIC`` on uint8; torch's bicubic kernel
(a = -0.75, edge replication) with ``antialias=False``, rounded and clamped to uint8, gives the
same pixels to within one gray level without an OpenCV dependency.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from agiqa.data.images import load_image

__all__ = ["INPUT_SIZE", "normalize", "read_pixels", "resize_pixels"]

INPUT_SIZE = 224


def resize_pixels(img: Image.Image | np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize an RGB image to uint8 [3, size, size] as the official code does (to within one
    gray level)."""
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB uint8 image of shape [H, W, 3], got {arr.shape} {arr.dtype}")
    x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255)[0].to(torch.uint8)


def read_pixels(path: str | os.PathLike, size: int = INPUT_SIZE) -> torch.Tensor:
    """Read an image file into the uint8 [3, 224, 224] tensor of the official code."""
    img, _ = load_image(path)
    return resize_pixels(img, size)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] → float model input ``(x / 255 − 0.5) / 0.5``."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    return (pixels.float() / 255.0 - 0.5) / 0.5
