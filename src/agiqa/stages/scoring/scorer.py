"""Inference: score images with a trained model.

:class:`Scorer` decodes images, asks :class:`~agiqa.stages.scoring.vectors.VectorProvider` for their
semantic vectors (computed only where the cache lacks them) and runs the model: scores, expert
gates and the zero-shot score, in rows that name each image, and the failures with their reasons.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agiqa.cache import SemanticCache
from agiqa.data.images import list_images, prepare_image
from agiqa.data.pixel_cache import PixelCache
from agiqa.data.pixels import resize_pixels
from agiqa.errors import BadImageError, ConfigError
from agiqa.models.agiqa_net import load_model
from agiqa.presets import agiqa_home
from agiqa.runtime import resolve_device
from agiqa.stages.predict import predict
from agiqa.stages.rundir import RunConfig, read_config
from agiqa.stages.scoring.results import ScoreReport, cached_items, decoded
from agiqa.stages.scoring.vectors import CHUNK, VectorProvider

__all__ = ["ScoreReport", "Scorer", "VectorProvider", "agiqa_home"]




class Scorer:
    """Scores images with a run directory or an imported official checkpoint.

    Args:
        model: the loaded model (:func:`agiqa.load_model`).
        config: the model's ``config.json`` (:func:`agiqa.stages.rundir.read_config`).
        cache_dir: the semantic cache to use and fill (default: content-addressed, per user).
        revision: the MLLM revision to load (default: the one the model records).
        trust_remote_code: allow the MLLM repository's code (default: what the model records).
        batch_size: images per MLLM forward pass, for files and PIL images alike.
        pixel_cache: keep and reuse the model's decoded 224×224 pixels under
            ``$AGIQA_HOME/pixels`` (the cache of ``fit`` and ``evaluate``).

    >>> scorer = Scorer.from_pretrained("runs/3k")          # doctest: +SKIP
    >>> scorer.score(["a.png", PIL.Image.open("b.jpg")])    # doctest: +SKIP
    """

    def __init__(self, model, cache_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 8, loader_workers: int = 2, progress: bool = False,
                 amp: bool = False, revision: str | None = None,
                 trust_remote_code: bool | None = None, config: RunConfig | None = None,
                 pixel_cache: bool = True):
        if config is None:
            raise ConfigError("Scorer needs the model's config.json (config=read_config(folder)); "
                              "Scorer.from_pretrained(folder) reads both")
        self.model = model
        self.config = config
        self.device = resolve_device(device)
        self.vectors = VectorProvider(config, cache_dir, self.device, batch_size,
                                      loader_workers, progress, revision, trust_remote_code)
        self.model.to(self.device)
        self.batch_size, self.loader_workers = batch_size, loader_workers
        self.prompt_names = self.vectors.prompt_names
        # the model's 224x224 pixels kept by image content, shared with fit and evaluate
        self.pixel_cache = PixelCache() if pixel_cache else None
        self.amp = amp  # bf16 autocast of the forward; float32 (the official code) by default
        # The MLLM's vision-once patch and the batches live on this Scorer: one call at a time.
        self._busy = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Scorer:
        return cls(load_model(path), config=read_config(Path(path)), **kwargs)

    # -- scoring -----------------------------------------------------------------------------------
    def score_paths(self, paths: list[str | os.PathLike]) -> ScoreReport:
        """Score image files; the report names them as given."""
        return self._score([(str(p), Path(p)) for p in paths])

    def score_folder(self, folder: str | os.PathLike, recursive: bool = True) -> ScoreReport:
        """Score every image of a folder; paths in the report are relative to it, with ``/``."""
        folder = Path(folder)
        unlisted: dict[str, str] = {}
        keys, others = list_images(folder, recursive, exclude=self.vectors.cache_dir,
                                   errors=unlisted)
        report = self._score([(k, folder / k) for k in keys], folder)
        report.skipped_files = others
        report.failures.update(unlisted)
        return report

    def _one_call(self):
        """Refuse a call while another thread is scoring with this Scorer (one line)."""
        if not self._busy.acquire(blocking=False):
            raise ConfigError("this Scorer is already scoring in another thread; use one Scorer "
                              "per thread (Scorer.from_pretrained in each)")
        return _Release(self._busy)

    def _score(self, items: list[tuple[str, Path]], folder: Path | None = None) -> ScoreReport:
        with self._one_call():
            return self._score_unlocked(items, folder)

    def _score_unlocked(self, items: list[tuple[str, Path]], folder: Path | None = None
                        ) -> ScoreReport:
        report = ScoreReport(columns=["path", "score", *self._gate_columns(), "zero_shot"])
        root = self.vectors.key_root(items, folder)
        keys = self.vectors.keys(items, root, report)
        self.score_keyed(items, keys, root, report)
        return report

    def score_keyed(self, items: list[tuple[str, Path]], keys: list[str | None],
                    root: Path | None, report: ScoreReport) -> None:
        """Score ``items`` whose cache keys are known (``None``: already failed in ``report``),
        adding rows in the order of ``items`` to ``report``; a Ray actor scores a slice so."""
        failures = self.vectors.fill(items, keys, root, report)
        cache = self.vectors.existing_cache()
        # In a rooted cache, a file whose bytes changed since extraction is computed again.
        changed: list[tuple[str, Path, str]] | None = None if root is None else []
        for start in range(0, len(items), CHUNK):
            chunk = [(label, path, key) for (label, path), key in
                     zip(items[start:start + CHUNK], keys[start:start + CHUNK], strict=True)
                     if label not in report.failures]
            ready = cached_items(cache, chunk, failures, report)
            if ready:
                self._predict(cache, ready, report, changed)
        if changed:
            cache, ready = self.vectors.recompute(changed, root, report)
            if ready:  # a file that changed again meanwhile fails this time
                self._predict(cache, ready, report, None)
            order = {label: i for i, (label, _) in enumerate(items)}
            report.rows.sort(key=lambda row: order[row["path"]])

    def _predict(self, cache: SemanticCache, ready: list[tuple[str, Path, str]],
                 report: ScoreReport, changed: list[tuple[str, Path, str]] | None) -> None:
        """Score files whose vectors are cached. A file whose bytes no longer match the cached
        ones goes to ``changed`` (to be computed again) if given, else fails."""
        data = cache.read([key for _, _, key in ready])
        kept, pixels = [], []
        for batch in decoded([path for _, path, _ in ready], True, self.batch_size,
                             self.loader_workers, self.pixel_cache):
            for i, px, sha, why in batch:
                label = ready[i][0]
                if why is not None:
                    report.failures[label] = why
                elif sha != data["sha256"][i]:
                    if changed is None:
                        report.failures[label] = "changed while it was being scored"
                    else:
                        changed.append(ready[i])
                else:
                    kept.append(i)
                    pixels.append(px)
        if not kept:
            return
        vectors = torch.from_numpy(data["vectors"][kept])
        scores, gates = predict(self.model, torch.stack(pixels), vectors, self.device, 32,
                                self.amp, with_gates=True)
        zs = data["zero_shot"][kept].mean(1)
        for j, i in enumerate(kept):
            why = _non_finite(scores[j], gates[j])
            if why:
                report.failures[ready[i][0]] = why
                continue
            report.rows.append({"path": ready[i][0], **self._columns(scores[j], gates[j], zs[j])})

    def _gate_columns(self) -> list[str]:
        return [f"gate_{n}" for n in [*self.prompt_names, "image"]]

    def _columns(self, score, gates, zero_shot) -> dict[str, Any]:
        row = {"score": float(score)}
        for name, g in zip([*self.prompt_names, "image"], gates.tolist(), strict=True):
            row[f"gate_{name}"] = g
        row["zero_shot"] = float(zero_shot) if math.isfinite(float(zero_shot)) else None
        return row

    def score(self, items: list[str | os.PathLike | Image.Image],
              errors: str = "report") -> list[dict[str, Any]]:
        """Scores of paths or PIL images, one row per item, in order.

        Every row has the same keys: ``path`` (the path as given, ``None`` for an in-memory
        image), ``score``, ``gate_<prompt>`` … ``gate_image``, ``zero_shot``, and ``error``:
        None, or why the item could not be scored (its numbers are then None), as
        ``score-folder`` reports it. ``errors="raise"`` raises :class:`BadImageError` for the
        first item that cannot be scored instead. PIL images run through the MLLM in batches of
        ``batch_size``; they are not cached.
        """
        if errors not in ("report", "raise"):
            raise ConfigError(f"errors must be 'report' or 'raise', got {errors!r}")
        if isinstance(items, str | bytes | os.PathLike | Image.Image):
            raise ConfigError(f"Scorer.score takes a list of paths or images, got one "
                              f"{type(items).__name__}: pass [{items!r}]"
                              if not isinstance(items, Image.Image) else
                              "Scorer.score takes a list of paths or images, got one image: "
                              "pass [image]")
        with self._one_call():
            return self._score_items(list(items), errors)

    def _score_items(self, items: list[str | os.PathLike | Image.Image], errors: str
                     ) -> list[dict[str, Any]]:
        names = [f"gate_{n}" for n in [*self.prompt_names, "image"]]
        out: list[dict[str, Any]] = [
            {"path": None if isinstance(x, Image.Image) else str(x), "score": None,
             **dict.fromkeys(names), "zero_shot": None, "error": None} for x in items]

        def fail(i: int, label: str, reason: str) -> None:
            if errors == "raise":
                raise BadImageError(label, reason)
            out[i]["error"] = reason

        paths = [(i, x) for i, x in enumerate(items) if not isinstance(x, Image.Image)]
        if paths:
            report = self._score_unlocked([(str(p), Path(p)) for _, p in paths])
            by_path = {r["path"]: r for r in report.rows}
            for i, p in paths:
                if str(p) in by_path:
                    out[i].update(by_path[str(p)])
                else:
                    fail(i, str(p), report.failures.get(str(p), "not scored"))
        images = [(i, x) for i, x in enumerate(items) if isinstance(x, Image.Image)]
        for start in range(0, len(images), self.batch_size):
            batch = []
            for i, im in images[start:start + self.batch_size]:
                try:  # the decoding rules of files: EXIF orientation, 16-bit, palette, alpha
                    batch.append((i, prepare_image(im, f"image {i} of the list")))
                except BadImageError as e:  # a truncated image, or samples files cannot hold
                    fail(i, e.path, e.reason)
            if not batch:
                continue
            vectors, zero_shot, refused = self.vectors.encode([im for _, im in batch])
            for j, reason in sorted(refused.items()):
                fail(batch[j][0], f"image {batch[j][0]} of the list", reason)
            keep = [j for j in range(len(batch)) if j not in refused]
            if not keep:
                continue
            pixels = torch.stack([resize_pixels(batch[j][1]) for j in keep])
            scores, gates = predict(self.model, pixels, vectors[keep], self.device, 32,
                                    self.amp, with_gates=True)
            zs = zero_shot[keep].mean(1)
            for n, j in enumerate(keep):
                why = _non_finite(scores[n], gates[n])
                if why:
                    fail(batch[j][0], f"image {batch[j][0]} of the list", why)
                    continue
                out[batch[j][0]].update(self._columns(scores[n], gates[n], zs[n]))
        return out


def _non_finite(score, gates) -> str | None:
    """Why a prediction is no score: a NaN or infinite score or gate."""
    values = [float(score), *(float(g) for g in gates.tolist())]
    if all(math.isfinite(v) for v in values):
        return None
    return f"the model gives a non-finite score ({float(score)}) for this image"


class _Release:
    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()

