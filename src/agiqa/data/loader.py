"""The one image path: every stage reads image files here, in loader processes that may die.

Stage one, ``fit``, ``evaluate`` and scoring read images through this module:

* **one decoder**: :func:`decode_file` (the rules of :mod:`agiqa.data.images`: regular files
  only, refusals by name, 16-bit, EXIF orientation, palette and alpha as OpenCV reads them),
  and :func:`agiqa.data.images.prepare_image` for images already in memory;
* **one pixel cache** for the model's uint8 224×224 input (:func:`model_pixels`): ``fit``,
  ``evaluate`` and scoring keep and reuse the same entries;
* **one loader pool** (:func:`ordered_load`): results come back in order, and a loader
  process killed by the operating system (out of memory) takes none of the run with it: the
  images it may have held are read again one per process, and an image whose process dies
  again fails by name (:data:`KILLED`) instead of hanging or ending the run.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from agiqa.data.images import decode_image, read_image_bytes
from agiqa.data.pixel_cache import PixelCache
from agiqa.data.pixels import resize_pixels
from agiqa.errors import AgiqaError

__all__ = ["KILLED", "Decoded", "decode_file", "model_pixels", "ordered_load", "read_images"]

KILLED = ("its loader process was killed by the operating system while reading it (out of "
          "memory?)")


def _reason(e: AgiqaError) -> str:
    return getattr(e, "reason", None) or str(e)


def decode_file(path: str | os.PathLike, name: str):
    """``(RGB image, sha256 of the bytes, None)`` or ``(None, None, reason)``: a bad file is a
    failure by name, never an exception."""
    try:
        data = read_image_bytes(path, name)
        return decode_image(data, name), hashlib.sha256(data).hexdigest(), None
    except AgiqaError as e:
        return None, None, _reason(e)


def model_pixels(path: str | os.PathLike, name: str, pixel_cache: PixelCache | None = None):
    """``(uint8 [3, 224, 224] pixels, sha256, None)`` or ``(None, None, reason)``. With a
    ``pixel_cache``, an image whose bytes it knows is read and hashed but not decoded, and
    what is decoded is kept there."""
    try:
        data = read_image_bytes(path, name)
        sha = hashlib.sha256(data).hexdigest()
        pixels = pixel_cache.get(sha) if pixel_cache is not None else None
        if pixels is None:
            pixels = resize_pixels(decode_image(data, name))
            if pixel_cache is not None:
                pixel_cache.put(sha, pixels)
        return pixels, sha, None
    except AgiqaError as e:
        return None, None, _reason(e)


class Decoded(NamedTuple):
    """One file read by :func:`read_images`: its position in the list, the RGB image or the
    uint8 pixels, the sha256 of its bytes, and why it failed (None when it did not)."""

    index: int
    value: object
    sha256: str | None
    reason: str | None


class _ReadChunk:
    """Positions → :class:`Decoded` of those files, in a loader process. Pixels travel as
    numpy arrays (pickled bytes, no shared-memory handle per image)."""

    def __init__(self, files: Sequence[tuple[Path, str]], pixels: bool,
                 pixel_cache: PixelCache | None):
        self.files, self.pixels, self.pixel_cache = files, pixels, pixel_cache

    def __call__(self, chunk: list[int]) -> list[Decoded]:
        out = []
        for i in chunk:
            path, name = self.files[i]
            if self.pixels:
                px, sha, why = model_pixels(path, name, self.pixel_cache)
                value = px.numpy() if px is not None else None
            else:
                value, sha, why = decode_file(path, name)
            out.append(Decoded(i, value, sha, why))
        return out


def read_images(files: Sequence[tuple[str | os.PathLike, str]], workers: int, *,
                pixels: bool, pixel_cache: PixelCache | None = None, chunk: int = 16,
                progress: bool = False, desc: str = "decode") -> Iterator[Decoded]:
    """Read ``files`` (``(path, name)`` pairs) in ``workers`` loader processes (0: in this
    one), yielding one :class:`Decoded` per file, in order: the model's uint8 224×224 pixels
    (``pixels=True``, through ``pixel_cache``) or the RGB image. A bad file, or one whose loader
    process is killed twice, is a :class:`Decoded` with its reason, not an exception."""
    files = [(Path(p), name) for p, name in files]
    chunks = [list(range(i, min(i + chunk, len(files)))) for i in range(0, len(files), chunk)]
    task = _ReadChunk(files, pixels, pixel_cache)
    results = ordered_load(task, chunks, workers, 4 * max(workers, 1),
                           split=lambda c: [[i] for i in c],
                           died=lambda c: [Decoded(c[0], None, None, KILLED)])
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
        for got in results:
            for d in got:
                if pixels and d.value is not None:
                    d = d._replace(value=torch.from_numpy(d.value))
                yield d
            bar.update(len(got))


_TASK = None  # the task function of a loader process, set once when it starts


def _start_loader(task) -> None:
    global _TASK
    _TASK = task
    torch.set_num_threads(1)
    # A forked loader inherits its parent's SIGTERM handler. The pool ends its loaders with
    # SIGTERM when one dies, and a parent's handler must not run in them: Ray's, in a process
    # that started a Ray node, shuts that node down (and the parent with it).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_task(item):
    return _TASK(item)


def _loader_pool(workers: int, task) -> ProcessPoolExecutor:
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_loader,
                               initargs=(task,))


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut a broken pool down without waiting on its other processes: their items are run
    again one at a time, and a process forked while another thread held a lock (a Ray driver's,
    say) may never exit by itself, nor on the SIGTERM the pool sends it."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def ordered_load(task: Callable, items: list, workers: int, ahead: int,
                 split: Callable[[object], list], died: Callable[[object], object]) -> Iterator:
    """``task(item)`` for each of ``items``, in order, run in ``workers`` processes with up to
    ``ahead`` items in flight (``workers=0``: in this process).

    A loader process that dies (killed by the operating system, e.g. for memory) takes none
    of the run with it: the items it may have held are run again one key at a time
    (``split(item)`` gives the one-key items), each in a process of its own, and a key whose
    process dies again gives ``died(key_item)``, its failure by name.
    """
    if workers == 0:
        for item in items:
            yield task(item)
        return
    pending: deque = deque()
    pool = _loader_pool(workers, task)
    try:
        at = 0
        while at < len(items) or pending:
            while at < len(items) and len(pending) < ahead:
                pending.append((items[at], pool.submit(_run_task, items[at])))
                at += 1
            item, future = pending.popleft()
            try:
                yield future.result()
                continue
            except BrokenProcessPool:
                pass
            _stop(pool)
            suspects = [(item, future), *pending]
            pending.clear()
            for item, future in suspects:
                if future.done() and not future.cancelled() and future.exception() is None:
                    yield future.result()
                    continue
                for one in split(item):
                    with _loader_pool(1, task) as alone:
                        try:
                            result = alone.submit(_run_task, one).result()
                        except BrokenProcessPool:
                            result = died(one)
                    yield result
            pool = _loader_pool(workers, task)
    finally:  # waits for the images in hand at most: no loader outlives the run
        pool.shutdown(wait=True, cancel_futures=True)

