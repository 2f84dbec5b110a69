"""Image decoding that never gives up silently: every refusal names the file and the reason.

CMYK, 16-bit, palette, RGBA, grayscale and EXIF-rotated images are converted to RGB the way
OpenCV's ``imread(IMREAD_COLOR)`` would read them (alpha dropped, orientation applied, 16-bit
samples shifted right by 8 bits whatever their range), so pixels match the official MA-AGIQA
preprocessing; images of 32-bit samples (float TIFFs), which that path cannot read, and
decompression bombs are refused.

Only regular files are read: a FIFO or device is refused without being opened for reading (a
FIFO would block forever); a symbolic link is followed when it leads to a regular file.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
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
    "read_image_bytes",
    "load_image",
    "normalize_key",
    "prepare_image",
    "regular_file",
    "resolve_key",
]

Image.init()
# The formats agiqa decodes: those of the official pipeline's readers (OpenCV's imread, PIL)
# for photographs and generated images. Others that Pillow knows are not images here: EPS and
# PS would run Ghostscript, PDF cannot be read, ICNS/ICO/… are no quality-assessment inputs.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "BMP", "DIB", "WEBP", "TIFF", "GIF",
                                  "PPM", "JPEG2000", "AVIF") if f in Image.OPEN)
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                             if fmt in IMAGE_FORMATS)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise BadImageError(name, f"has no pixels ({img.width}×{img.height})")
    if img.mode == "F" or (img.mode == "I" and img.getextrema()[1] > 65535):
        raise BadImageError(name, f"{'floating-point' if img.mode == 'F' else '32-bit'} samples: "
                            "OpenCV's imread(IMREAD_COLOR), the official decoder, cannot read "
                            "them either; save it with 8 or 16 bits per sample")
    if img.mode in _SIXTEEN_BIT_MODES:
        # OpenCV (libpng's strip_16, and its 16-bit gray TIFF path) keeps the high byte: v >> 8,
        # whatever the range, so a dark 16-bit image stays dark.
        arr = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def prepare_image(img: Image.Image, name: str) -> Image.Image:
    """An image already in memory (a PIL image) under the rules of files: EXIF orientation
    applied, 16-bit samples shifted, palette and alpha as OpenCV reads them, 32-bit and
    floating-point samples refused; so it gives the pixels of the same image read from a file.
    Raises :class:`BadImageError` naming ``name``."""
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img), name)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(name, f"cannot read the image: {str(e) or type(e).__name__}") \
            from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise :class:`BadImageError` naming ``name``."""
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, name)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, f"refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        raise BadImageError(name, f"cannot decode: {reason}") from None


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not an image"
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file; refused without reading it"


def regular_file(path: str | os.PathLike, name: str | None = None) -> Path:
    """``path`` if it is (or links to) a regular file, else :class:`BadImageError` with why.

    Never opens the file, so a FIFO cannot block.
    """
    name = name or str(path)
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise BadImageError(name, f"broken symbolic link (to {os.readlink(path)})") from None
        raise BadImageError(name, "file not found") from None
    except OSError as e:
        raise BadImageError(name, f"cannot read: {e.strerror or e}") from None
    reason = _not_regular(st.st_mode)
    if reason:
        raise BadImageError(name, reason)
    return path


def _read_regular(path: Path, name: str) -> bytes:
    regular_file(path, name)
    try:
        # O_NONBLOCK: should the file have become a FIFO since the check, opening cannot block.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except OSError as e:
        raise BadImageError(name, f"cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        reason = _not_regular(os.fstat(fd).st_mode)
        if reason:
            raise BadImageError(name, reason)
        try:
            return f.read()
        except OSError as e:
            raise BadImageError(name, f"cannot read: {e.strerror or e}") from None


def read_image_bytes(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The bytes of an image file, refusing what is not a regular file (a FIFO, a folder, a
    broken link) with :class:`BadImageError` naming ``name``."""
    return _read_regular(Path(path), name or str(path))


def load_image(path: str | os.PathLike, name: str | None = None) -> tuple[Image.Image, str]:
    """Read and decode an image file. Returns the RGB image and the sha256 of the file bytes."""
    name = name or str(path)
    data = _read_regular(Path(path), name)
    return decode_image(data, name), hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_images(root: str | os.PathLike, recursive: bool = True,
                exclude: str | os.PathLike | None = None,
                errors: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """List the image files below ``root`` as sorted keys (relative paths with ``/``).

    Returns ``(image_keys, other_keys)``: files whose extension is an image type
    (:data:`IMAGE_EXTENSIONS`), and the remaining files, reported to the user as skipped, among
    them files whose name is not valid UTF-8 (a key must be text). Hidden files and folders
    are ignored, and so is ``exclude`` (the output folder, when it lies inside ``root``).

    Linked folders are followed, each real folder once: a link back to a folder already
    walked (a loop, or a second link to one folder) is not walked again. Links to files, even
    broken ones, and FIFOs are listed: reading them reports what they are.

    Nothing vanishes from the walk: a folder that cannot be listed (no permission, a path past
    the system's limit) is put in ``errors`` (its key with a trailing ``/`` → the reason), to
    be reported like a file that cannot be read. Without ``errors``, it raises.

    Raises:
        DatasetError: ``root`` is not a folder, or (without ``errors``) a folder below it cannot
            be listed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    skip = Path(exclude).resolve() if exclude is not None else None
    images: list[str] = []
    others: list[str] = []
    seen: set[tuple[int, int]] = set()
    unlisted: dict[str, str] = {}

    def failed(e: OSError) -> None:
        where = Path(e.filename) if e.filename else root
        try:
            key = where.relative_to(root).as_posix()
        except ValueError:
            key = str(where)
        key = "./" if key == "." else key + "/"
        unlisted[key] = f"cannot list this folder: {e.strerror or e}; its images are not scored"

    for folder, dirs, files in os.walk(root, onerror=failed, followlinks=True):
        here = Path(folder)
        try:
            st = here.stat()
        except OSError as e:
            failed(e)
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or (skip is not None and here.resolve() == skip):
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            if name.startswith("."):
                continue
            key = (here / name).relative_to(root).as_posix()
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, kept as surrogates by os.fsdecode
                others.append(key)
                continue
            (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else others).append(key)
    if unlisted and errors is None:
        key, reason = sorted(unlisted.items())[0]
        more = f" (and {len(unlisted) - 1} more folder(s))" if len(unlisted) > 1 else ""
        raise DatasetError(f"{root / key}: {reason}{more}")
    if errors is not None:
        errors.update(unlisted)
    return sorted(images), sorted(others)


def normalize_key(key: str) -> str:
    """One spelling per image: ``/`` separators, no ``.`` or ``x/..`` parts (``./a.jpg``,
    ``sub/../a.jpg`` and ``a.jpg`` are one key). A key that escapes keeps its leading ``..``."""
    key = key.replace("\\", "/")
    if not key:
        return key
    norm = posixpath.normpath(key)
    return norm[2:] if norm.startswith("./") else norm


def resolve_key(root: str | os.PathLike, key: str, source: str = "label file") -> Path:
    """Return ``root/key``, refusing keys that are absolute or escape ``root``.

    The check is on the path as written; a symbolic link inside the root is the user's own
    choice and is followed when the file is read.
    """
    root_path = Path(root).resolve()
    if "\0" in key:
        raise DatasetError(f"{source}: image path {key!r} contains a NUL byte")
    if not key or os.path.isabs(key) or key.startswith(("/", "\\")):
        raise DatasetError(f"{source}: image path {key!r} is absolute; paths must be relative")
    norm = normalize_key(key)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise DatasetError(
            f"{source}: image path {key!r} escapes the image root {root_path}")
    return root_path / norm
