"""Inference: score images with a trained model, computing semantic vectors the cache lacks.

Stage one runs only for images the cache does not hold, with the MLLM recorded in the model's
fingerprint; the default cache lives under ``$AGIQA_HOME/caches`` (``~/.cache/agiqa``), one per
fingerprint, keyed by absolute path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agiqa.cache import fingerprint_of, open_cache
from agiqa.data.images import list_images, load_image
from agiqa.data.pixels import resize_pixels
from agiqa.errors import CheckpointError, ConfigError
from agiqa.models.agiqa_net import load_model
from agiqa.models.mllm import SemanticEncoder
from agiqa.presets import PromptSet
from agiqa.runtime import resolve_device
from agiqa.stages.predict import predict
from agiqa.stages.semantics import ExtractConfig, ImageSource, extract_semantics, semantic_spec_of

__all__ = ["ScoreReport", "Scorer", "agiqa_home"]


def agiqa_home() -> Path:
    """The per-user data folder: ``$AGIQA_HOME``, else ``~/.cache/agiqa``."""
    return Path(os.environ.get("AGIQA_HOME") or Path.home() / ".cache" / "agiqa")


@dataclass
class ScoreReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def summary(self) -> dict[str, Any]:
        scores = [r["score"] for r in self.rows]
        return {"count": len(scores), "failed": len(self.failures),
                "mean": sum(scores) / len(scores) if scores else None,
                "min": min(scores) if scores else None, "max": max(scores) if scores else None}

    def write(self, out: str | os.PathLike) -> None:
        """Write the rows atomically: ``.json`` (rows, failures, summary) or CSV otherwise."""
        import csv

        from agiqa.fileio import atomic_path, write_json

        out = Path(out)
        if out.suffix == ".json":
            write_json(out, {"rows": self.rows, "failures": self.failures,
                             "summary": self.summary()})
            return
        columns = list(self.rows[0]) if self.rows else ["path", "score"]
        with atomic_path(out) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(self.rows)


class Scorer:
    """Scores images with a run directory or an imported official checkpoint.

    >>> scorer = Scorer.from_pretrained("runs/3k")          # doctest: +SKIP
    >>> scorer.score(["a.png", PIL.Image.open("b.jpg")])    # doctest: +SKIP
    """

    def __init__(self, model, cache_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 8, loader_workers: int = 2, progress: bool = False):
        cfg = model.agiqa_config
        if not cfg.get("semantics"):
            raise CheckpointError("the model records no MLLM (semantic fingerprint); import "
                                  "official checkpoints with --cache CACHE")
        self.model = model
        self.spec = cfg["semantics"]
        self.fingerprint = cfg.get("fingerprint") or fingerprint_of(self.spec)
        self.prompt_names = cfg.get("prompt_names") or [f"prompt{i + 1}" for i in
                                                        range(len(self.spec["prompts"]))]
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else \
            agiqa_home() / "caches" / self.fingerprint[:16]
        self.batch_size, self.loader_workers, self.progress = batch_size, loader_workers, progress
        self._encoder: SemanticEncoder | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Scorer:
        return cls(load_model(path), **kwargs)

    @property
    def encoder(self) -> SemanticEncoder:
        if self._encoder is None:
            s = self.spec
            prompts = PromptSet(names=list(self.prompt_names), texts=list(s["prompts"]),
                                answer_prefix=s["answer_prefix"], rating_words=s["rating_words"],
                                rating_weights=s["rating_weights"])
            enc = SemanticEncoder(s["model"], prompts, device=str(self.device), dtype=s["dtype"],
                                  pad_square=(s.get("recipe") or {}).get("pad_square"))
            if fingerprint_of(semantic_spec_of(enc)) != self.fingerprint:
                raise ConfigError(
                    f"the MLLM {s['model']} found now has fingerprint "
                    f"{fingerprint_of(semantic_spec_of(enc))[:16]}, the model was trained on "
                    f"{self.fingerprint[:16]} (another revision or dtype?)")
            self._encoder = enc
        return self._encoder

    def _columns(self, score, gates, zero_shot) -> dict[str, Any]:
        row = {"score": float(score)}
        for name, g in zip([*self.prompt_names, "image"], gates.tolist()):
            row[f"gate_{name}"] = g
        row["zero_shot"] = float(zero_shot)
        return row

    def score_paths(self, paths: list[str | os.PathLike]) -> ScoreReport:
        """Score image files; vectors come from the cache or are computed into it."""
        abs_keys = [Path(p).resolve().as_posix().lstrip("/") for p in paths]
        source = ImageSource(Path("/"), abs_keys)
        cfg = ExtractConfig(out=self.cache_dir, model=self.spec["model"], dtype=self.spec["dtype"],
                            batch_size=self.batch_size, loader_workers=self.loader_workers,
                            progress=self.progress, device=str(self.device), workers=1, worker=0)
        cache_has_all = (self.cache_dir / "manifest.json").is_file() and all(
            k in open_cache(self.cache_dir) for k in abs_keys)
        report = ScoreReport()
        if not cache_has_all:
            extract_semantics(cfg, source, self.encoder)
        cache = open_cache(self.cache_dir)
        known_failures = cache.failures
        good = []
        for p, k in zip(paths, abs_keys):
            if k in cache:
                good.append((p, k))
            else:
                report.failures[str(p)] = known_failures.get(k, "no semantic vector")
        if good:
            data = cache.read([k for _, k in good])
            # The file is read here anyway: its hash tells whether the cached vectors are stale.
            decoded = [load_image(p) for p, _ in good]
            fresh = [i for i, (_, sha) in enumerate(decoded) if sha == data["sha256"][i]]
            for i in sorted(set(range(len(good))) - set(fresh)):
                report.failures[str(good[i][0])] = (
                    f"changed since its vectors were cached in {self.cache_dir}; "
                    "score it with another --cache")
            good = [good[i] for i in fresh]
            data = {k: v[fresh] for k, v in data.items() if k != "sha256"}
            pixels = torch.stack([resize_pixels(decoded[i][0]) for i in fresh]) if fresh else None
        if good:
            scores, gates = predict(self.model, pixels, torch.from_numpy(data["vectors"]),
                                    self.device, 32, with_gates=True)
            zs = data["zero_shot"].mean(1)
            for i, (p, _) in enumerate(good):
                report.rows.append({"path": str(p), **self._columns(scores[i], gates[i], zs[i])})
        return report

    def score(self, items: list[str | os.PathLike | Image.Image]) -> list[dict[str, Any]]:
        """Scores of paths or PIL images, in order: dicts with score, gates and zero_shot.

        Raises the file's error for a path that cannot be scored.
        """
        out: list[dict[str, Any] | None] = [None] * len(items)
        paths = [(i, x) for i, x in enumerate(items) if not isinstance(x, Image.Image)]
        if paths:
            report = self.score_paths([p for _, p in paths])
            by_path = {r["path"]: r for r in report.rows}
            for i, p in paths:
                if str(p) not in by_path:
                    from agiqa.errors import BadImageError

                    raise BadImageError(str(p), report.failures.get(str(p), "not scored"))
                out[i] = by_path[str(p)]
        images = [(i, x.convert("RGB")) for i, x in enumerate(items) if isinstance(x, Image.Image)]
        if images:
            enc = self.encoder.load(progress=self.progress)
            imgs = [im for _, im in images]
            vecs, zss = [], []
            for p in range(len(enc.prompts.texts)):
                v, z = enc.encode(enc.prepare(imgs, p), p)
                vecs.append(v)
                zss.append(z)
            vectors = torch.stack(vecs, 1).to(torch.float16)
            pixels = torch.stack([resize_pixels(im) for im in imgs])
            scores, gates = predict(self.model, pixels, vectors, self.device, 32, with_gates=True)
            zs = torch.stack(zss, 1).mean(1)
            for j, (i, _) in enumerate(images):
                out[i] = self._columns(scores[j], gates[j], zs[j])
        return out  # type: ignore[return-value]

    def score_folder(self, folder: str | os.PathLike, recursive: bool = True) -> ScoreReport:
        """Score every image of a folder; paths in the report are relative to it."""
        folder = Path(folder)
        keys, others = list_images(folder, recursive)
        report = self.score_paths([folder / k for k in keys])
        prefix = len(str(folder)) + 1
        for r in report.rows:
            r["path"] = r["path"][prefix:]
        report.failures = {p[prefix:]: why for p, why in report.failures.items()}
        report.skipped_files = others
        return report
