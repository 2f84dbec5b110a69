"""Inference: score images with a trained model, computing only the semantic vectors a cache lacks.

The MLLM is the one the model's fingerprint records, at the recorded revision, so a hub
repository that moved on still gives the vectors the model was trained on. Two kinds of cache:

* a cache with a recorded image root (what ``extract-semantics`` writes, or what a new
  ``--cache DIR`` becomes): keys are paths relative to that root, so ``score-folder DIR --cache
  C`` reuses exactly what ``extract-semantics --images DIR --out C`` wrote, ``cache verify``
  keeps working, and a file that changed since extraction is computed again (its vectors
  replaced, as a rerun of ``extract-semantics`` does) before it is scored;
* the default per-user cache, ``$AGIQA_HOME/caches/<fingerprint>``, keyed by the sha256 of the
  file bytes (``sha256/<hex>``): the same bytes anywhere are computed once, on every OS, and a
  rewritten image is simply a new key.

Whatever the cache holds, its fingerprint must be the model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agiqa.cache import MANIFEST, SemanticCache, fingerprint_of, open_cache
from agiqa.data.images import file_sha256, list_images
from agiqa.data.pixels import resize_pixels
from agiqa.errors import (
    BadImageError,
    CacheMismatchError,
    CheckpointError,
    ConfigError,
    ModelLoadError,
)
from agiqa.models.agiqa_net import load_model
from agiqa.models.mllm import SemanticEncoder
from agiqa.presets import PromptSet, agiqa_home
from agiqa.runtime import resolve_device
from agiqa.stages.predict import predict
from agiqa.stages.score_io import (
    ScoreReport,
    cached_items,
    content_key,
    decoded,
    write_content_shard,
)
from agiqa.stages.semantics import ExtractConfig, ImageSource, extract_semantics, semantic_spec_of

__all__ = ["ScoreReport", "Scorer", "agiqa_home"]

_CHUNK = 1024  # images per cache read, decode round and new shard


class Scorer:
    """Scores images with a run directory or an imported official checkpoint.

    Args:
        model: the loaded model (:func:`agiqa.load_model`).
        cache_dir: the semantic cache to use and fill (default: content-addressed, per user).
        revision: the MLLM revision to load (default: the one the model records).
        trust_remote_code: allow the MLLM repository's code (default: what the model records).
        batch_size: images per MLLM forward pass, for files and PIL images alike.

    >>> scorer = Scorer.from_pretrained("runs/3k")          # doctest: +SKIP
    >>> scorer.score(["a.png", PIL.Image.open("b.jpg")])    # doctest: +SKIP
    """

    def __init__(self, model, cache_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 8, loader_workers: int = 2, progress: bool = False,
                 amp: bool = False, revision: str | None = None,
                 trust_remote_code: bool | None = None):
        cfg = model.agiqa_config
        if not cfg.get("semantics"):
            raise CheckpointError("the model records no MLLM (semantic fingerprint); import "
                                  "official checkpoints again with agiqa import-official "
                                  "(--mllm MLLM or --cache CACHE)")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.spec = cfg["semantics"]
        self.pad_square = (self.spec.get("recipe") or {}).get("pad_square")
        self.fingerprint = cfg.get("fingerprint") or fingerprint_of(self.spec)
        self.prompt_names = cfg.get("prompt_names") or [f"prompt{i + 1}" for i in
                                                        range(len(self.spec["prompts"]))]
        recorded = self.spec.get("revision")
        # A local folder's "revision" is a content label, not something to check out.
        self.recorded_revision = None if str(recorded or "").startswith("local-") else recorded
        self.revision = revision or self.recorded_revision
        self.trust_remote_code = bool(cfg.get("trust_remote_code", False)) \
            if trust_remote_code is None else trust_remote_code
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.loader_workers, self.progress = batch_size, loader_workers, progress
        self.amp = amp  # bf16 autocast of the forward; float32 (the official code) by default
        self._encoder: SemanticEncoder | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Scorer:
        return cls(load_model(path), **kwargs)

    # -- the MLLM and the cache ----------------------------------------------------------------
    @property
    def revision_overridden(self) -> bool:
        return self.revision != self.recorded_revision

    @property
    def encoder(self) -> SemanticEncoder:
        """The MLLM of the model's fingerprint (config and processor; weights on first use)."""
        if self._encoder is None:
            self._encoder = self._make_encoder()
        return self._encoder

    def _make_encoder(self) -> SemanticEncoder:
        s = self.spec
        prompts = PromptSet(names=list(self.prompt_names), texts=list(s["prompts"]),
                            answer_prefix=s["answer_prefix"], rating_words=s["rating_words"],
                            rating_weights=s["rating_weights"])
        try:
            enc = SemanticEncoder(s["model"], prompts, revision=self.revision,
                                  device=str(self.device), dtype=s["dtype"],
                                  trust_remote_code=self.trust_remote_code,
                                  pad_square=self.pad_square)
        except ModelLoadError as e:
            if self.revision_overridden:
                raise ModelLoadError(
                    f"cannot load revision {self.revision} of MLLM {s['model']} (the model was "
                    f"trained with revision {self.recorded_revision}): {e}") from None
            raise ModelLoadError(
                f"cannot load MLLM {s['model']} at revision {self.revision}, the revision the "
                f"model was trained with ({e}); if that revision is gone, pass --revision REV "
                "to score with vectors of another revision") from None
        found = fingerprint_of(semantic_spec_of(enc))
        if not self.revision_overridden and found != self.fingerprint:
            raise ConfigError(
                f"the MLLM {s['model']} found now has fingerprint {found[:16]} (revision "
                f"{enc.resolved_revision}), the model was trained on {self.fingerprint[:16]} "
                f"(revision {s.get('revision')}); another revision or dtype?")
        return enc

    @property
    def vector_fingerprint(self) -> str:
        """The fingerprint of the vectors this scorer uses: the model's, unless ``--revision``
        picked another revision of the MLLM."""
        if not self.revision_overridden:
            return self.fingerprint
        return fingerprint_of(semantic_spec_of(self.encoder))

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        return agiqa_home() / "caches" / self.vector_fingerprint[:16]

    def _existing_cache(self) -> SemanticCache | None:
        """The cache, if it exists, after checking that it holds this model's kind of vectors."""
        if not (self.cache_dir / MANIFEST).is_file():
            return None
        cache = open_cache(self.cache_dir)
        expected = self.vector_fingerprint
        if cache.fingerprint != expected:
            theirs, ours = cache.spec, self.spec
            raise CacheMismatchError(
                str(self.cache_dir), expected, cache.fingerprint,
                f"it holds vectors of {theirs.get('model')} at revision "
                f"{theirs.get('revision')} ({theirs.get('dtype')}), the model needs "
                f"{ours.get('model')} at revision {self.revision or ours.get('revision')} "
                f"({ours.get('dtype')})")
        return cache

    def _extract_config(self) -> ExtractConfig:
        return ExtractConfig(out=self.cache_dir, model=self.spec["model"], revision=self.revision,
                             dtype=self.spec["dtype"], batch_size=self.batch_size,
                             loader_workers=self.loader_workers, progress=self.progress,
                             device=str(self.device), trust_remote_code=self.trust_remote_code,
                             pad_square=self.pad_square, workers=1, worker=0)

    # -- vectors ---------------------------------------------------------------------------------
    def _encode(self, images: list[Image.Image]
                ) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
        """The forward passes of every prompt over ``images``: float16-rounded vectors
        [n, P, D], zero-shot scores [n, P] and the images refused (position → reason)."""
        enc = self.encoder.load(progress=self.progress)
        n_prompts = len(enc.prompts.texts)
        refused: dict[int, str] = {}
        try:
            inputs = enc.prepare.all_prompts(images)
        except Exception:  # noqa: BLE001 - find the images the processor refuses, keep the rest
            for j, img in enumerate(images):
                try:
                    enc.prepare.all_prompts([img])
                except Exception as e:  # noqa: BLE001
                    refused[j] = f"the MLLM's processor refused it ({type(e).__name__}: {e})"
            kept = [img for j, img in enumerate(images) if j not in refused]
            inputs = enc.prepare.all_prompts(kept) if kept else []
        vectors = torch.zeros(len(images), n_prompts, enc.dim)
        zero_shot = torch.zeros(len(images), n_prompts)
        rows = [j for j in range(len(images)) if j not in refused]
        if rows:
            v, z = enc.encode_all(inputs)
            vectors[rows], zero_shot[rows] = v.float().cpu(), z.float().cpu()
        half = vectors.to(torch.float16)
        for j in rows:
            if not (torch.isfinite(half[j]).all() and torch.isfinite(zero_shot[j]).all()):
                refused[j] = "the MLLM produced a non-finite or float16-overflowing vector"
        return half.float(), zero_shot, refused

    def _fill_content(self, todo: dict[str, Path]) -> dict[str, str]:
        """Compute the vectors of ``todo`` (content key → file) into the content-addressed
        cache, a shard per ``_CHUNK`` images. Returns the failures (key → reason)."""
        enc = self.encoder
        cache = SemanticCache.create(self.cache_dir, semantic_spec_of(enc), enc.prompts.names,
                                     enc.dim)
        keys = list(todo)
        failures: dict[str, str] = {}
        pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for batch in decoded([todo[k] for k in keys], False, self.batch_size,
                              self.loader_workers):
            failures.update({keys[i]: why for i, _, _, why in batch if why is not None})
            good = [(keys[i], img, sha) for i, img, sha, why in batch if why is None]
            if not good:
                continue
            vectors, zero_shot, refused = self._encode([img for _, img, _ in good])
            for j, (key, _, sha) in enumerate(good):
                if j in refused:
                    failures[key] = refused[j]
                else:  # keyed by the bytes just read, even if the file changed since
                    pending.append((sha, vectors[j], zero_shot[j]))
            if len(pending) >= _CHUNK:
                write_content_shard(cache, pending)
                pending = []
        if pending:
            write_content_shard(cache, pending)
        return failures

    def _fill(self, items: list[tuple[str, Path]], keys: list[str | None],
              root: Path | None, report: ScoreReport) -> dict[str, str]:
        """Compute the vectors the cache lacks; returns the failures (key → reason)."""
        cache = self._existing_cache()
        todo: dict[str, Path] = {}
        for (label, path), key in zip(items, keys, strict=True):
            if key is not None and label not in report.failures and \
                    (cache is None or key not in cache):
                todo.setdefault(key, path)
        if not todo:
            return {}
        if root is None:
            failures = self._fill_content(todo)
        else:
            extracted = extract_semantics(self._extract_config(), ImageSource(root, sorted(todo)),
                                          self.encoder)
            failures = dict(extracted.failures)
        report.computed += len(todo) - len(failures)
        return failures

    # -- scoring -----------------------------------------------------------------------------------
    def score_paths(self, paths: list[str | os.PathLike]) -> ScoreReport:
        """Score image files; the report names them as given."""
        return self._score([(str(p), Path(p)) for p in paths])

    def score_folder(self, folder: str | os.PathLike, recursive: bool = True) -> ScoreReport:
        """Score every image of a folder; paths in the report are relative to it, with ``/``."""
        folder = Path(folder)
        keys, others = list_images(folder, recursive, exclude=self._cache_dir)
        report = self._score([(k, folder / k) for k in keys], folder)
        report.skipped_files = others
        return report

    def _key_root(self, items: list[tuple[str, Path]], folder: Path | None) -> Path | None:
        """The image root keys are relative to, or None for content keys."""
        if self._cache_dir is None:
            return None  # the default cache is content-addressed
        cache = self._existing_cache()
        if cache is not None:
            return cache.root
        if not items:
            return None
        # A new --cache is rooted at the scored folder (or the files' common folder).
        if folder is not None:
            return folder.resolve()
        return Path(os.path.commonpath([p.resolve().parent for _, p in items]))

    def _keys(self, items: list[tuple[str, Path]], root: Path | None,
              report: ScoreReport) -> list[str | None]:
        keys: list[str | None] = []
        for label, path in items:
            try:
                if root is None:
                    keys.append(content_key(file_sha256(path)))
                else:
                    keys.append(path.resolve().relative_to(root).as_posix())
                continue
            except ValueError:
                report.failures[label] = (f"outside the image root {root} of cache "
                                          f"{self.cache_dir}; score it with another --cache")
            except FileNotFoundError:
                report.failures[label] = "file not found"
            except OSError as e:
                report.failures[label] = f"cannot read: {e.strerror or e}"
            keys.append(None)
        return keys

    def _score(self, items: list[tuple[str, Path]], folder: Path | None = None) -> ScoreReport:
        report = ScoreReport()
        root = self._key_root(items, folder)
        keys = self._keys(items, root, report)
        failures = self._fill(items, keys, root, report)
        cache = self._existing_cache()
        # In a rooted cache, a file whose bytes changed since extraction is computed again.
        changed: list[tuple[str, Path, str]] | None = None if root is None else []
        for start in range(0, len(items), _CHUNK):
            chunk = [(label, path, key) for (label, path), key in
                     zip(items[start:start + _CHUNK], keys[start:start + _CHUNK], strict=True)
                     if label not in report.failures]
            ready = cached_items(cache, chunk, failures, report)
            if ready:
                self._predict(cache, ready, report, changed)
        if changed:
            self._recompute(changed, root, report)
            order = {label: i for i, (label, _) in enumerate(items)}
            report.rows.sort(key=lambda row: order[row["path"]])
        return report

    def _recompute(self, changed: list[tuple[str, Path, str]], root: Path,
                   report: ScoreReport) -> None:
        """Compute again the vectors of files that changed since they were cached (as a rerun
        of ``extract-semantics`` does: only those files are hashed again), then score them."""
        extracted = extract_semantics(self._extract_config(),
                                      ImageSource(root, sorted({k for _, _, k in changed})),
                                      self.encoder)
        recomputed = set(extracted.changed) - set(extracted.failures)
        report.computed += len(recomputed)
        report.changed += [label for label, _, key in changed if key in recomputed]
        cache = self._existing_cache()
        ready = cached_items(cache, changed, dict(extracted.failures), report)
        if ready:  # a file that changed again meanwhile fails this time
            self._predict(cache, ready, report, None)

    def _predict(self, cache: SemanticCache, ready: list[tuple[str, Path, str]],
                 report: ScoreReport, changed: list[tuple[str, Path, str]] | None) -> None:
        """Score files whose vectors are cached. A file whose bytes no longer match the cached
        ones goes to ``changed`` (to be computed again) if given, else fails."""
        data = cache.read([key for _, _, key in ready])
        kept, pixels = [], []
        for batch in decoded([path for _, path, _ in ready], True, self.batch_size,
                              self.loader_workers):
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
            report.rows.append({"path": ready[i][0], **self._columns(scores[j], gates[j], zs[j])})

    def _columns(self, score, gates, zero_shot) -> dict[str, Any]:
        row = {"score": float(score)}
        for name, g in zip([*self.prompt_names, "image"], gates.tolist(), strict=True):
            row[f"gate_{name}"] = g
        row["zero_shot"] = float(zero_shot)
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
            report = self.score_paths([p for _, p in paths])
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
                try:
                    batch.append((i, im.convert("RGB")))
                except (OSError, ValueError) as e:  # a truncated or unreadable image
                    fail(i, f"image {i} of the list", f"cannot read the image: {e}")
            if not batch:
                continue
            vectors, zero_shot, refused = self._encode([im for _, im in batch])
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
                out[batch[j][0]].update(self._columns(scores[n], gates[n], zs[n]))
        return out

