"""The semantic vectors a trained model needs, computed only where the cache lacks them.

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

import torch
from PIL import Image

from agiqa.cache import MANIFEST, SemanticCache, SemanticSpec, fingerprint_of, open_cache
from agiqa.cache.keyed import content_key, write_content_shard
from agiqa.data.images import file_sha256
from agiqa.errors import CacheMismatchError, CheckpointError, ConfigError, ModelLoadError
from agiqa.models.mllm import SemanticEncoder
from agiqa.presets import PromptSet, agiqa_home
from agiqa.runtime import resolve_device
from agiqa.stages.extraction.extract import (
    ExtractConfig,
    ImageSource,
    extract_semantics,
    semantic_spec_of,
)
from agiqa.stages.rundir import RunConfig
from agiqa.stages.scoring.results import ScoreReport, cached_items, decoded

__all__ = ["CHUNK", "VectorProvider"]

CHUNK = 1024  # images per cache read, decode round and new shard


class VectorProvider:
    """The semantic vectors a trained model needs, computed only where the cache lacks them.

    It owns the MLLM of the model's fingerprint (at the recorded revision, or ``revision``),
    the cache (rooted at an image folder, or the per-user content-addressed one), the keys of
    files in it, and the computation of missing or changed vectors. :class:`Scorer` asks it for
    vectors and scores them.
    """

    def __init__(self, model_config: RunConfig, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "auto", batch_size: int = 8,
                 loader_workers: int = 2, progress: bool = False, revision: str | None = None,
                 trust_remote_code: bool | None = None):
        cfg = model_config
        if cfg.semantics is None:
            raise CheckpointError("the model records no MLLM (semantic fingerprint); import "
                                  "official checkpoints again with agiqa import-official "
                                  "(--mllm MLLM or --cache CACHE)")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.spec: SemanticSpec = cfg.semantics
        self.pad_square = self.spec.pad_square
        self.fingerprint = cfg.fingerprint or self.spec.fingerprint
        self.prompt_names = cfg.gate_names
        recorded = self.spec.revision
        # A local folder's "revision" is a content label, not something to check out.
        self.recorded_revision = None if str(recorded or "").startswith("local-") else recorded
        self.revision = revision or self.recorded_revision
        self.trust_remote_code = bool(cfg.trust_remote_code) \
            if trust_remote_code is None else trust_remote_code
        self.device = resolve_device(device) if isinstance(device, str) else device
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.loader_workers, self.progress = batch_size, loader_workers, progress
        self._encoder: SemanticEncoder | None = None

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
        prompts = PromptSet(names=list(self.prompt_names), texts=list(s.prompts),
                            answer_prefix=s.answer_prefix, rating_words=list(s.rating_words),
                            rating_weights=list(s.rating_weights))
        try:
            enc = SemanticEncoder(s.model, prompts, revision=self.revision,
                                  device=str(self.device), dtype=s.dtype,
                                  trust_remote_code=self.trust_remote_code,
                                  pad_square=self.pad_square)
        except ModelLoadError as e:
            if self.revision_overridden:
                raise ModelLoadError(
                    f"cannot load revision {self.revision} of MLLM {s.model} (the model was "
                    f"trained with revision {self.recorded_revision}): {e}") from None
            raise ModelLoadError(
                f"cannot load MLLM {s.model} at revision {self.revision}, the revision the "
                f"model was trained with ({e}); if that revision is gone, pass --revision REV "
                "to score with vectors of another revision") from None
        found = fingerprint_of(semantic_spec_of(enc))
        if not self.revision_overridden and found != self.fingerprint:
            raise ConfigError(
                f"the MLLM {s.model} found now has fingerprint {found[:16]} (revision "
                f"{enc.resolved_revision}), the model was trained on {self.fingerprint[:16]} "
                f"(revision {s.revision}); another revision or dtype?")
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

    def existing_cache(self) -> SemanticCache | None:
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
                f"{ours.model} at revision {self.revision or ours.revision} "
                f"({ours.dtype})")
        return cache

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig(out=self.cache_dir, mllm=self.spec.model, revision=self.revision,
                             dtype=self.spec.dtype, batch_size=self.batch_size,
                             loader_workers=self.loader_workers, progress=self.progress,
                             device=str(self.device), trust_remote_code=self.trust_remote_code,
                             pad_square=self.pad_square, workers=1, worker=0)

    def encode(self, images: list[Image.Image]
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
        cache, a shard per ``CHUNK`` images. Returns the failures (key → reason)."""
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
            vectors, zero_shot, refused = self.encode([img for _, img, _ in good])
            for j, (key, _, sha) in enumerate(good):
                if j in refused:
                    failures[key] = refused[j]
                else:  # keyed by the bytes just read, even if the file changed since
                    pending.append((sha, vectors[j], zero_shot[j]))
            if len(pending) >= CHUNK:
                write_content_shard(cache, pending)
                pending = []
        if pending:
            write_content_shard(cache, pending)
        return failures

    def fill(self, items: list[tuple[str, Path]], keys: list[str | None],
              root: Path | None, report: ScoreReport) -> dict[str, str]:
        """Compute the vectors the cache lacks; returns the failures (key → reason)."""
        cache = self.existing_cache()
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
            extracted = extract_semantics(self.extract_config(), ImageSource(root, sorted(todo)),
                                          self.encoder)
            failures = dict(extracted.failures)
        report.computed += len(todo) - len(failures)
        return failures

    def key_root(self, items: list[tuple[str, Path]], folder: Path | None) -> Path | None:
        """The image root keys are relative to, or None for content keys."""
        if self._cache_dir is None:
            return None  # the default cache is content-addressed
        cache = self.existing_cache()
        if cache is not None:
            return cache.root_for([p for _, p in items])
        if not items:
            return None
        # A new --cache is rooted at the scored folder (or the files' common folder).
        if folder is not None:
            return folder.resolve()
        return Path(os.path.commonpath([p.resolve().parent for _, p in items]))

    def keys(self, items: list[tuple[str, Path]], root: Path | None,
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

    def recompute(self, changed: list[tuple[str, Path, str]], root: Path,
                  report: ScoreReport) -> tuple[SemanticCache, list[tuple[str, Path, str]]]:
        """Compute again the vectors of files that changed since they were cached (as a rerun
        of ``extract-semantics`` does: only those files are hashed again); returns the cache
        and the items now ready to score."""
        extracted = extract_semantics(self.extract_config(),
                                      ImageSource(root, sorted({k for _, _, k in changed})),
                                      self.encoder)
        recomputed = set(extracted.changed) - set(extracted.failures)
        report.computed += len(recomputed)
        report.changed += [label for label, _, key in changed if key in recomputed]
        cache = self.existing_cache()
        return cache, cached_items(cache, changed, dict(extracted.failures), report)
