"""Image decoding that never gives up silently: every refusal names the file and the reason.

CMYK, 16-bit, palette, RGBA, grayscale and EXIF-rotated images are converted to RGB the way
OpenCV's ``imread(IMREAD_COLOR)`` would read them (alpha dropped, orientation applied), so
pixels match the official MA-AGIQA preprocessing; decompression bombs are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agiqa.errors import BadImageError, DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "decode_image",
    "file_sha256",
    "list_images",
    "load_image",
    "resolve_key",
]

Image.init()
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535; scale to 8 bits as OpenCV's IMREAD_COLOR does (>> 8).
        if arr.max(initial=0) > 255:
            arr = arr / 256.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise :class:`BadImageError` naming ``name``."""
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, f"refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        raise BadImageError(name, f"cannot decode: {reason}") from None


def load_image(path: str | os.PathLike, name: str | None = None) -> tuple[Image.Image, str]:
    """Read and decode an image file. Returns the RGB image and the sha256 of the file bytes."""
    name = name or str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(name, "is a directory, not an image") from None
    except OSError as e:
        raise BadImageError(name, f"cannot read: {e.strerror or e}") from None
    return decode_image(data, name), hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_images(root: str | os.PathLike, recursive: bool = True) -> tuple[list[str], list[str]]:
    """List the image files below ``root`` as sorted keys (relative paths with ``/``).

    Returns ``(image_keys, other_keys)``: files whose extension is an image type, and the
    remaining files (reported to the user as skipped). Hidden files and folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    images: list[str] = []
    others: list[str] = []
    pattern = "**/*" if recursive else "*"
    for path in root.glob(pattern):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        key = rel.as_posix()
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(key)
    return sorted(images), sorted(others)


def resolve_key(root: str | os.PathLike, key: str, source: str = "label file") -> Path:
    """Return ``root/key``, refusing keys that are absolute or escape ``root``."""
    root_path = Path(root).resolve()
    if not key or os.path.isabs(key) or key.startswith(("/", "\\")):
        raise DatasetError(f"{source}: image path {key!r} is absolute; paths must be relative")
    path = (root_path / key).resolve()
    try:
        path.relative_to(root_path)
    except ValueError:
        raise DatasetError(
            f"{source}: image path {key!r} escapes the image root {root_path}"
        ) from None
    return path
