"""``agiqa experiment``: a plan of runs over data sets, variants and seeds, one table at the end.

A plan (a TOML file, or a built-in one under ``presets/plans``) names data sets, the semantic
caches (MLLM and prompts) to read, the seeds (``repeats`` or ``split_seeds``), variants (each a
table of ``fit`` options) and optionally cross pairs (train on A, evaluate on B). Every run goes
through the stages' own ``fit`` and ``evaluate``; this module only lays them out and collects
what they write.

The plan runs as a list of independent groups, one per (training data set, variant): a group
is the ``fit`` series of its seeds (trained together on a GPU, one after another on a CPU: the
``fit`` defaults) followed by its cross evaluations. :func:`run_group` runs one group and
returns its rows, so another engine can dispatch groups.

The output folder::

    DIR/plan.json        the plan as run (a later run may only add runs to it)
    DIR/caches/C/D/      the semantic cache of cache C on data set D (unless cache_dir is set)
    DIR/runs/V/D/seed-S  the run folders of ``fit`` (``split-S`` with split_seeds)
    DIR/evals/V/A__B/seed-S   the cross evaluations (``evaluate --out``)
    DIR/results.csv      one row per run and test set
    DIR/table.csv, table.md   mean ± sample std per variant, training set and test set
    DIR/report.html      the table with each cell's runs, linking the runs' own reports
    DIR/timing.json      the throughput measured so far (the estimate of the next invocation)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agiqa.errors import AgiqaError, ConfigError, UsageError
from agiqa.fileio import atomic_path, read_json, read_text, write_json, write_text
from agiqa.options import check_known, cli_naming, spell
from agiqa.stages.configs import ExperimentConfig, FitConfig, model_experts
from agiqa.tomlio import parse_toml, toml_value

__all__ = ["RESULT_COLUMNS", "TABLE_COLUMNS", "ExperimentTable", "Group", "Plan", "PlanError",
           "ResultRow", "TableRow", "experiment", "list_plans", "load_plan", "plan_groups",
           "run_group", "summarise"]

RESULT_COLUMNS = ("variant", "train_dataset", "test_dataset", "seed", "split_seed", "srcc",
                  "plcc", "krcc", "rmse", "best_epoch", "run_dir")
METRICS = ("srcc", "plcc", "krcc", "rmse")
TABLE_COLUMNS = ("variant", "train_dataset", "test_dataset", "n",
                 *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")])

# fit options the plan itself sets: never in [fit] or a variant.
_PLAN_FIELDS = {"dataset", "root", "cache", "out", "labels", "target", "image_column",
                "score_column", "repeats", "split_seeds", "seed", "split_seed", "resume",
                "progress"}
_FIT_OPTIONS = sorted({f.name for f in dataclasses.fields(FitConfig)} - _PLAN_FIELDS)
# Options of how a run is executed, not of what it computes: not part of a run's identity.
_RUNTIME = {"device", "concurrent_runs", "loader_workers", "pixel_cache", "eval_batch_size"}
_TOP = {"description", "repeats", "split_seeds", "seed", "split_seed", "cache_dir", "fit",
        "datasets", "caches", "variants", "cross", "published"}
_DATASET_KEYS = {"preset", "root", "labels", "target", "image_column", "score_column",
                 "generate", "crops"}
_CACHE_KEYS = {"model", "prompts", "revision", "format", "batch_size", "shard_size", "device",
               "dtype", "trust_remote_code", "loader_workers", "attn_implementation",
               "pad_square", "fuse_prompts"}
_CROSS_KEYS = {"train", "test", "split"}
_PUBLISHED_KEYS = {"variant", "train_dataset", "test_dataset", "srcc", "plcc", "krcc", "rmse",
                   "source"}
TINY_MLLM = "tiny:"  # a cache model "tiny:llava" is built once under DIR/mllms/


class PlanError(ConfigError):
    """A plan that cannot run: one line naming the plan file and the field."""


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    name: str
    preset: str
    root: Path | None = None
    labels: Path | None = None
    target: str | None = None
    image_column: str | None = None
    score_column: str | None = None
    generate: str | None = None  # "demo": the demo's graded set, made under DIR/data/NAME
    crops: int = 4

    def identity(self) -> dict[str, Any]:
        """What the runs' results depend on (not where the images are)."""
        return {"preset": self.preset, "labels": self.labels.name if self.labels else None,
                "target": self.target, "image_column": self.image_column,
                "score_column": self.score_column, "generate": self.generate,
                "crops": self.crops if self.generate else None}


@dataclass
class CacheSpec:
    name: str
    model: str
    prompts: str = "paper"
    options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "prompts": self.prompts,
                **{k: v for k, v in self.options.items()
                   if k not in ("device", "loader_workers", "batch_size")}}


@dataclass
class Variant:
    name: str
    options: dict[str, Any]
    semantics: str  # the plan cache whose vectors the variant reads


@dataclass
class CrossPair:
    train: str
    test: str
    split: str = "all"  # all: every image of B; test: B's test split under the plan's split

    @property
    def label(self) -> str:
        return self.test if self.split == "all" else f"{self.test}/test"


@dataclass
class Plan:
    """A checked plan. ``source`` is the file it was read from (named in every error)."""

    name: str
    source: str
    description: str
    datasets: dict[str, DatasetSpec]
    caches: dict[str, CacheSpec]
    variants: dict[str, Variant]
    fit: dict[str, Any]
    repeats: int = 1
    split_seeds: int = 1
    seed: int = 20
    split_seed: int | None = None
    cross: list[CrossPair] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: Path | None = None

    @property
    def runs_per_group(self) -> int:
        return max(self.repeats, self.split_seeds)

    def seeds(self) -> list[tuple[int, int, str]]:
        """(training seed, split seed, folder name) of each run of a group, as ``fit`` names
        them (``seed-S`` for repeats, ``split-S`` for split seeds)."""
        base = self.seed if self.split_seed is None else self.split_seed
        if self.split_seeds > 1:
            return [(self.seed + i, base + i, f"split-{base + i}")
                    for i in range(self.split_seeds)]
        return [(self.seed + i, base, f"seed-{self.seed + i}") for i in range(self.repeats)]


def list_plans() -> dict[str, str]:
    """Built-in and user plans: name → description."""
    from agiqa.presets import list_presets, load_plan_preset

    return {name: load_plan_preset(name).summary()["description"]
            for name in list_presets("plans")}


def _set(table: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = table.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise PlanError(f"{source}: {_flag('--set', 'overrides=')} {dotted!r}: {k} is not a "
                            "table")
        table = nxt
    table[keys[-1]] = value


def load_plan(plan: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None,
              roots: dict[str, str | os.PathLike] | None = None) -> Plan:
    """Read and check a plan: a TOML file or a plan preset's name (``agiqa experiment --list``).

    Args:
        plan: the file or the preset's name.
        overrides: ``KEY=VALUE`` strings (or a dict) set into the plan before it is checked,
            with dotted keys (``repeats=2``, ``fit.backbone=tiny``,
            ``caches.mplug-owl2.model=/models/owl2``); values are read as TOML values.
        roots: the image folder of each data set, by the plan's data set name.

    Raises:
        PlanError: one line naming the plan file and the field.
    """
    from agiqa.presets import load_plan_preset

    path = Path(plan)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found")
        source, name = str(path), path.stem
        try:
            text = read_text(path, 1 << 20, "plan file")
        except (OSError, ValueError) as e:
            raise PlanError(f"{path}: not readable ({e})") from None
    else:
        preset = load_plan_preset(str(plan))
        source, name, text = preset.source, preset.name, preset.text
    try:
        d = parse_toml(text, source)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    items = overrides.items() if isinstance(overrides, dict) else \
        [_split_override(o, source) for o in overrides or []]
    for key, value in items:
        _set(d, key, value, source)
    return _check_plan(d, name, source, {k: Path(v) for k, v in (roots or {}).items()})


def _flag(flag: str, keyword: str) -> str:
    """An option as the caller writes it: its flag on the command line, its keyword in Python."""
    return flag if cli_naming() else keyword


def _split_override(text: str, source: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise PlanError(f"{source}: {_flag('--set', 'overrides=')} {text!r}: give KEY=VALUE")
    return key.strip(), toml_value(value.strip())


def _table(d: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise PlanError(f"{source}: {where}: a table is needed, got {d!r}")
    return d


def _keys(d: dict[str, Any], known: set[str], where: str, source: str) -> None:
    for k in d:
        if k not in known:
            raise PlanError(f"{source}: {where}{k}: unknown key (known: "
                            f"{', '.join(sorted(known))}){_hint(k, sorted(known))}")


def _fit_options(d: dict[str, Any], where: str, source: str,
                 extra: set[str] = frozenset()) -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        k = key.replace("-", "_")
        if k in extra:
            out[k] = value
            continue
        if k in _PLAN_FIELDS:
            raise PlanError(f"{source}: {where}.{key}: set by the plan itself (its top level "
                            "or data sets), not a fit option here")
        if k not in _FIT_OPTIONS:
            raise PlanError(f"{source}: {where}.{key}: unknown fit option"
                            f"{_hint(k, _FIT_OPTIONS)}")
        out[k] = value
    return out


def _check_plan(d: dict[str, Any], name: str, src: str, roots: dict[str, Path]) -> Plan:
    _keys(d, _TOP, "", src)
    base = _fit_options(_table(d.get("fit", {}), "fit", src), "fit", src)
    # datasets
    datasets: dict[str, DatasetSpec] = {}
    for ds_name, t in _table(d.get("datasets", {}), "datasets", src).items():
        t = _table(t, f"datasets.{ds_name}", src)
        _keys(t, _DATASET_KEYS, f"datasets.{ds_name}.", src)
        root = roots.get(ds_name, t.get("root"))
        spec = DatasetSpec(ds_name, t.get("preset", ds_name), Path(root) if root else None,
                           Path(t["labels"]) if t.get("labels") else None, t.get("target"),
                           t.get("image_column"), t.get("score_column"), t.get("generate"),
                           int(t.get("crops", 4)))
        if spec.generate not in (None, "demo"):
            raise PlanError(f"{src}: datasets.{ds_name}.generate: only \"demo\" (the demo's "
                            f"graded set) is known, got {spec.generate!r}")
        _check_preset(spec, src)
        if spec.root is None and spec.generate is None:
            raise PlanError(f"{src}: datasets.{ds_name}.root: missing; give the image folder "
                            f"with {_flag(f'--root {ds_name}=DIR', f'roots={{{ds_name!r}: DIR}}')}")
        datasets[ds_name] = spec
    if not datasets:
        raise PlanError(f"{src}: datasets: the plan names no data set")
    unknown_roots = sorted(set(roots) - set(datasets))
    if unknown_roots:
        raise PlanError(f"{src}: {_flag('--root', 'roots=')} {unknown_roots[0]!r}: the plan has no "
                        f"such data set (it has {', '.join(datasets)})")
    # caches
    caches: dict[str, CacheSpec] = {}
    for c_name, t in _table(d.get("caches", {}), "caches", src).items():
        t = _table(t, f"caches.{c_name}", src)
        _keys(t, _CACHE_KEYS, f"caches.{c_name}.", src)
        if "model" not in t:
            raise PlanError(f"{src}: caches.{c_name}.model: missing (an MLLM preset, hub id, "
                            "folder or tiny:llava)")
        opts = {k: v for k, v in t.items() if k not in ("model", "prompts")}
        caches[c_name] = CacheSpec(c_name, str(t["model"]), str(t.get("prompts", "paper")), opts)
    if not caches:
        raise PlanError(f"{src}: caches: the plan names no semantic cache")
    # variants
    variants: dict[str, Variant] = {}
    for v_name, t in _table(d.get("variants", {"ma-agiqa": {}}), "variants", src).items():
        opts = _fit_options(_table(t, f"variants.{v_name}", src), f"variants.{v_name}", src,
                            {"semantics"})
        sem = str(opts.pop("semantics", next(iter(caches))))
        if sem not in caches:
            raise PlanError(f"{src}: variants.{v_name}.semantics: no cache {sem!r} in the plan "
                            f"(it has {', '.join(caches)}){_hint(sem, list(caches))}")
        variants[v_name] = Variant(v_name, {**base, **opts}, sem)
    repeats, split_seeds = int(d.get("repeats", 1)), int(d.get("split_seeds", 1))
    if repeats < 1 or split_seeds < 1:
        raise PlanError(f"{src}: repeats and split_seeds must be at least 1")
    if repeats > 1 and split_seeds > 1:
        raise PlanError(f"{src}: repeats, split_seeds: give one of them")
    plan = Plan(name, src, str(d.get("description", "")), datasets, caches, variants, base,
                repeats, split_seeds, int(d.get("seed", 20)),
                None if d.get("split_seed") is None else int(d["split_seed"]),
                cache_dir=Path(d["cache_dir"]) if d.get("cache_dir") else None)
    for v in variants.values():
        _check_variant(plan, v)
    for i, t in enumerate(d.get("cross", [])):
        t = _table(t, f"cross[{i}]", src)
        _keys(t, _CROSS_KEYS, f"cross[{i}].", src)
        pair = CrossPair(str(t.get("train", "")), str(t.get("test", "")),
                         str(t.get("split", "all")))
        _check_cross(plan, pair, i)
        plan.cross.append(pair)
    for i, t in enumerate(d.get("published", [])):
        t = _table(t, f"published[{i}]", src)
        _keys(t, _PUBLISHED_KEYS, f"published[{i}].", src)
        if not t.get("source"):
            raise PlanError(f"{src}: published[{i}].source: a published figure needs its "
                            "source")
        plan.published.append(dict(t))
    return plan


def _check_preset(spec: DatasetSpec, src: str) -> None:
    from agiqa.presets import list_presets

    if spec.generate:
        return
    names = list_presets("datasets")
    if spec.preset not in names:
        raise PlanError(f"{src}: datasets.{spec.name}.preset: unknown data set preset "
                        f"{spec.preset!r} (choose from {', '.join(names)})"
                        f"{_hint(spec.preset, names)}")


def _fit_config(plan: Plan, variant: Variant, ds: DatasetSpec | None = None, **runtime: Any
                ) -> FitConfig:
    """The ``fit`` config of a group (paths are placeholders when only checking)."""
    fields = {**variant.options, **{k: v for k, v in runtime.items() if v is not None}}
    if ds is None:
        where = {"dataset": "csv", "root": Path("."), "cache": Path("."), "out": Path(".")}
    else:
        where = {"dataset": "csv" if ds.generate else ds.preset, "root": ds.root,
                 "labels": ds.labels, "target": ds.target, "image_column": ds.image_column,
                 "score_column": ds.score_column, "cache": Path("."), "out": Path(".")}
    return FitConfig(**where, **fields, seed=plan.seed, split_seed=plan.split_seed,
                     repeats=plan.repeats, split_seeds=plan.split_seeds)


def _check_variant(plan: Plan, v: Variant) -> None:
    from agiqa.presets import load_prompts

    where = f"{plan.source}: variants.{v.name}"
    try:
        cfg = _fit_config(plan, v)
    except TypeError as e:
        raise PlanError(f"{where}: {e}") from None
    except ConfigError as e:
        raise PlanError(f"{where}: {e}") from None
    cache = plan.caches[v.semantics]
    try:
        names = load_prompts(cache.prompts).names
    except ConfigError as e:
        raise PlanError(f"{plan.source}: caches.{cache.name}.prompts: {e}") from None
    try:
        model_experts(cfg.experts, cfg.fusion, names, f"cache {cache.name} (prompts "
                      f"{cache.prompts})", label=f"{where}.experts")
    except ConfigError as e:
        raise PlanError(str(e)) from None


def _score_range(ds: DatasetSpec) -> tuple[float, float] | None:
    from agiqa.presets import load_dataset_preset

    if ds.generate:
        return (1.0, 5.0)  # the demo's MOS
    r = load_dataset_preset(ds.preset).score_range
    return tuple(r) if r else None


def _check_cross(plan: Plan, pair: CrossPair, i: int) -> None:
    where = f"{plan.source}: cross[{i}]"
    for key in ("train", "test"):
        name = getattr(pair, key)
        if name not in plan.datasets:
            raise PlanError(f"{where}.{key}: no data set {name!r} in the plan (it has "
                            f"{', '.join(plan.datasets)}){_hint(name, list(plan.datasets))}")
    if pair.split not in ("all", "test"):
        raise PlanError(f"{where}.split: all (every image of the test set) or test (its test "
                        f"split), got {pair.split!r}")
    a, b = _score_range(plan.datasets[pair.train]), _score_range(plan.datasets[pair.test])
    if a != b:
        for v in plan.variants.values():
            if v.options.get("score_norm", "none") == "none":
                shown = [f"{r[0]:g} to {r[1]:g}" if r else "unknown" for r in (a, b)]
                raise PlanError(
                    f"{where}: {pair.train} ({shown[0]}) and {pair.test} ({shown[1]}) have "
                    f"different score scales; set score_norm = \"zscore\" in [fit] (variant "
                    f"{v.name} trains on raw MOS)")


# -- the groups ------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    seed: int
    split_seed: int
    run_dir: Path


@dataclass
class Group:
    """One data set × variant: the ``fit`` series of its seeds, then its cross evaluations.

    Everything :func:`run_group` needs, as plain data (another engine may send it elsewhere).
    """

    variant: str
    dataset: str
    fit: FitConfig
    runs: list[RunSpec]
    cross: list[tuple[CrossPair, DatasetSpec, Path]]  # pair, test set, its cache
    eval_dir: Path
    report_dir: Path

    def pending(self) -> list[RunSpec]:
        return [r for r in self.runs if not (r.run_dir / "metrics.json").is_file()]


@dataclass
class ResultRow:
    variant: str
    train_dataset: str
    test_dataset: str
    seed: int
    split_seed: int
    srcc: float | None
    plcc: float | None
    krcc: float | None
    rmse: float | None
    best_epoch: int | None
    run_dir: str
    error: str = ""

    def to_csv(self) -> list[str]:
        def num(x):
            return "" if x is None else repr(float(x))

        return [self.variant, self.train_dataset, self.test_dataset, str(self.seed),
                str(self.split_seed), num(self.srcc), num(self.plcc), num(self.krcc),
                num(self.rmse), "" if self.best_epoch is None else str(self.best_epoch),
                self.run_dir, self.error]


@dataclass
class TableRow:
    variant: str
    train_dataset: str
    test_dataset: str
    n: int
    srcc_mean: float
    srcc_std: float
    plcc_mean: float
    plcc_std: float
    krcc_mean: float
    krcc_std: float
    rmse_mean: float
    rmse_std: float
    failed: int = 0
    published: dict[str, Any] | None = None


@dataclass
class ExperimentTable:
    """What :func:`experiment` returns: the table, every run's row and the output folder."""

    out: Path
    plan: str
    rows: list[TableRow]
    runs: list[ResultRow]

    @property
    def failed(self) -> list[ResultRow]:
        return [r for r in self.runs if r.error]

    def to_markdown(self) -> str:
        return _markdown(self)

    def row(self, variant: str, train_dataset: str, test_dataset: str | None = None) -> TableRow:
        test = test_dataset or train_dataset
        for r in self.rows:
            if (r.variant, r.train_dataset, r.test_dataset) == (variant, train_dataset, test):
                return r
        raise KeyError((variant, train_dataset, test))


def _cache_path(plan: Plan, out: Path, cache: str, ds: str) -> Path:
    return (plan.cache_dir or out / "caches") / cache / ds


def _dataset_paths(plan: Plan, out: Path) -> dict[str, DatasetSpec]:
    """The data sets with generated ones placed under ``out/data``."""
    specs = {}
    for name, ds in plan.datasets.items():
        if ds.generate and ds.root is None:
            root = out / "data" / name
            ds = dataclasses.replace(ds, root=root, labels=root / "labels.csv")
        specs[name] = ds
    return specs


def plan_groups(plan: Plan, out: str | os.PathLike, device: str | None = None,
                concurrent_runs: int | None = None) -> list[Group]:
    """The plan's groups (data set × variant), in plan order (data sets, then variants)."""
    out = Path(out)
    datasets = _dataset_paths(plan, out)
    groups = []
    for ds_name, ds in datasets.items():
        for v in plan.variants.values():
            group_dir = out / "runs" / v.name / ds_name
            cfg = _fit_config(plan, v, ds, device=device, concurrent_runs=concurrent_runs)
            cfg = dataclasses.replace(cfg, cache=_cache_path(plan, out, v.semantics, ds_name),
                                      out=group_dir, progress=False)
            runs = [RunSpec(s, ss, group_dir / folder) for s, ss, folder in plan.seeds()]
            cross = [(p, datasets[p.test], _cache_path(plan, out, v.semantics, p.test))
                     for p in plan.cross if p.train == ds_name]
            groups.append(Group(v.name, ds_name, cfg, runs, cross, out / "evals" / v.name,
                                out / "reports" / v.name / ds_name))
    return groups


def _identity(plan: Plan, group: Group) -> dict[str, str]:
    """Each run's id → a hash of what its result depends on (for the changed-plan check)."""
    v = plan.variants[group.variant]
    what = {"fit": {k: v_ for k, v_ in v.options.items() if k not in _RUNTIME},
            "dataset": plan.datasets[group.dataset].identity(),
            "cache": plan.caches[v.semantics].identity()}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    ids = {}
    for r in group.runs:
        ids[f"{group.variant}|{group.dataset}|{group.dataset}|{r.seed}|{r.split_seed}"] = digest
        for pair, _, _ in group.cross:
            test_id = plan.datasets[pair.test].identity()
            h = hashlib.sha256(f"{digest}{json.dumps(test_id, sort_keys=True)}".encode())
            ids[f"{group.variant}|{group.dataset}|{pair.label}|{r.seed}|{r.split_seed}"] = \
                h.hexdigest()
    return ids


def _check_against_previous(plan: Plan, out: Path, ids: dict[str, str]) -> None:
    previous_file = out / "plan.json"
    if not previous_file.is_file():
        return
    previous = read_json(previous_file).get("runs", {})
    removed = [k for k in previous if k not in ids]
    changed = [k for k in previous if k in ids and previous[k] != ids[k]]
    if removed or changed:
        key = (changed or removed)[0].split("|")
        what = "changes" if changed else "drops"
        raise PlanError(f"{plan.source}: the plan {what} run {key[0]} on {key[1]} "
                        f"(test {key[2]}, seed {key[3]}) of the experiment in {out}; a plan may "
                        "only add runs to an existing folder: choose another --out")


# -- running -------------------------------------------------------------------------------------
def _ensure_data(plan: Plan, out: Path, datasets: dict[str, DatasetSpec]) -> None:
    from agiqa.pipeline.demo import DEMO_SET, make_graded_set

    for ds in datasets.values():
        if ds.generate and not (ds.labels and ds.labels.is_file()):
            make_graded_set(ds.root, photos=list(DEMO_SET), distortions=("blur",), grades=6,
                            crops=ds.crops, seed=0)


def _mllm(spec: CacheSpec, out: Path) -> str:
    if not spec.model.startswith(TINY_MLLM):
        return spec.model
    from agiqa.models.mllm.tiny import build_tiny_mllm

    family = spec.model[len(TINY_MLLM):]
    folder = out / "mllms" / f"tiny-{family}"
    if not (folder / "config.json").is_file():
        build_tiny_mllm(family, folder)
    return str(folder)


def _load_ds(ds: DatasetSpec, require_scores: bool = True):
    from agiqa.data.datasets import load_dataset

    return load_dataset("csv" if ds.generate else ds.preset, ds.root, ds.labels, ds.target,
                        ds.image_column, ds.score_column, require_scores=require_scores)


def _needed_extractions(plan: Plan, out: Path, datasets: dict[str, DatasetSpec]
                        ) -> list[tuple[CacheSpec, DatasetSpec, Path, bool]]:
    """(cache, data set, folder, already complete) of every cache a run reads."""
    from agiqa.cache import open_cache

    needed: dict[tuple[str, str], None] = {}
    for v in plan.variants.values():
        for ds in datasets:
            needed[(v.semantics, ds)] = None
    found = []
    for c, ds_name in needed:
        ds = datasets[ds_name]
        path = _cache_path(plan, out, c, ds_name)
        done = False
        if (path / "manifest.json").is_file() and ds.root is not None and \
                (not ds.generate or (ds.labels and ds.labels.is_file())):
            try:
                cache = open_cache(path)
                done = all(k in cache for k in _load_ds(ds, False).keys)
            except AgiqaError:
                done = False
        found.append((plan.caches[c], ds, path, done))
    return found


def _extract(spec: CacheSpec, ds: DatasetSpec, path: Path, out: Path, progress: bool) -> float:
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

    opts = dict(spec.options)
    cfg = ExtractConfig(out=path, model=_mllm(spec, out), prompts=spec.prompts,
                        progress=progress, **opts)
    report = extract_semantics(cfg, ImageSource.from_dataset(_load_ds(ds, False)))
    return report.images_per_second


def _row_of(group: Group, run: RunSpec, test: str, metrics: dict[str, Any] | None,
            best_epoch: int | None, error: str = "") -> ResultRow:
    m = metrics or {}
    return ResultRow(group.variant, group.dataset, test, run.seed, run.split_seed,
                     m.get("srcc"), m.get("plcc"), m.get("krcc"), m.get("rmse"), best_epoch,
                     str(run.run_dir), error)


def _failure(result: Any, run: RunSpec) -> str:
    """The error ``fit`` reported for a run that did not finish, if it says (read loosely:
    a list of run results with ``out`` and ``error``, or a dict of them)."""
    failed = result.get("failed") if isinstance(result, dict) else \
        getattr(result, "failed", None)
    items = failed.values() if isinstance(failed, dict) else failed or []
    for info in items:
        get = info.get if isinstance(info, dict) else lambda k, i=info: getattr(i, k, None)
        if get("out") is not None and Path(str(get("out"))) == run.run_dir and get("error"):
            return str(get("error"))
    return "the run did not finish"


def _train(group: Group, resume: bool) -> dict[str, str]:
    """Train the group's pending runs through ``fit``; errors by run folder."""
    from agiqa.pipeline.api import fit
    from agiqa.stages.rundir import run_folder

    pending = group.pending()
    if not pending:
        return {}
    errors: dict[str, str] = {}
    interrupted = [r for r in pending if (r.run_dir / "checkpoint.pt").is_file()]
    if interrupted and not resume:
        return {str(r.run_dir): f"interrupted run ({r.run_dir / 'checkpoint.pt'}); rerun with "
                "--resume to finish it" for r in pending}
    group_dir = group.fit.out
    try:
        if not group_dir.is_dir():  # a marked folder of runs, as a fit series makes
            with run_folder(group_dir, False):
                pass
        if len(group.runs) == 1:
            r = group.runs[0]
            result = fit(dataclasses.replace(
                group.fit, out=r.run_dir, seed=r.seed, split_seed=r.split_seed, repeats=1,
                split_seeds=1, resume=(r.run_dir / "checkpoint.pt").is_file()))
        else:
            result = fit(dataclasses.replace(group.fit, resume=True))
    except (AgiqaError, RuntimeError, ValueError, OSError) as e:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, AgiqaError) else str(e)
        return {str(r.run_dir): msg.splitlines()[0] if msg else type(e).__name__
                for r in pending if not (r.run_dir / "metrics.json").is_file()}
    for r in pending:
        if not (r.run_dir / "metrics.json").is_file():
            errors[str(r.run_dir)] = _failure(result, r)
    return errors


def _evaluate(group: Group, run: RunSpec, pair: CrossPair, test: DatasetSpec, cache: Path,
              plan: Plan) -> tuple[dict[str, Any] | None, str]:
    """The cross evaluation of one run (read back if done): metrics, error."""
    from agiqa.data.splits import make_split
    from agiqa.stages.scoring.evaluate import evaluate_model

    folder = group.eval_dir / f"{group.dataset}__{pair.label.replace('/', '-')}" / \
        run.run_dir.name
    done = folder / "evaluation.json"
    if done.is_file():
        return read_json(done)["metrics"], ""
    try:
        ds = _load_ds(test)
        if pair.split == "test":
            split = make_split(ds, group.fit.split, run.split_seed)
            keep = set(split.subset("test"))
            ds = dataclasses.replace(ds, samples=[s for s in ds.samples if s.key in keep])
        evaluate_model(run.run_dir, ds, cache, "all", group.fit.device, group.fit.eval_batch_size,
                       loader_workers=group.fit.loader_workers, progress=False, out=folder)
    except (AgiqaError, RuntimeError, ValueError, OSError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    return read_json(done)["metrics"], ""


def _run_report(group: Group, run: RunSpec) -> None:
    """Each run's own HTML report (``agiqa report RUN``), written once beside the table."""
    from agiqa.report.html import write_run_report

    page = group.report_dir / f"{run.run_dir.name}.html"
    if page.is_file() or not (run.run_dir / "metrics.json").is_file():
        return
    page.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_run_report(run.run_dir, page, maps=False, max_images=24)
    except (AgiqaError, OSError, ValueError):
        pass  # the table links the run folder instead


def run_group(group: Group, resume: bool = False, plan: Plan | None = None,
              reports: bool = True) -> list[ResultRow]:
    """Run one group: train its pending runs through ``fit`` (finished ones are read back,
    untouched), evaluate its cross pairs, and return a row per run and test set (failed runs
    carry their error)."""
    errors = _train(group, resume)
    rows: list[ResultRow] = []
    for run in group.runs:
        metrics_file = run.run_dir / "metrics.json"
        if not metrics_file.is_file():
            err = errors.get(str(run.run_dir), "the run did not finish")
            rows.append(_row_of(group, run, group.dataset, None, None, err))
            rows += [_row_of(group, run, p.label, None, None, err) for p, _, _ in group.cross]
            continue
        m = read_json(metrics_file)
        rows.append(_row_of(group, run, group.dataset, m["test"], m.get("best_epoch")))
        for pair, test, cache in group.cross:
            metrics, err = _evaluate(group, run, pair, test, cache, plan)
            rows.append(_row_of(group, run, pair.label, metrics, m.get("best_epoch"), err))
        if reports:
            _run_report(group, run)
    return rows


# -- the table -----------------------------------------------------------------------------------
def summarise(runs: list[ResultRow], published: list[dict[str, Any]] | None = None
              ) -> list[TableRow]:
    """Mean and sample std (ddof 1) per variant, training set and test set, over the runs that
    finished (std is NaN for one run)."""
    import numpy as np

    cells: dict[tuple[str, str, str], list[ResultRow]] = {}
    for r in runs:
        cells.setdefault((r.variant, r.train_dataset, r.test_dataset), []).append(r)
    rows = []
    for (v, a, b), rs in cells.items():
        ok = [r for r in rs if not r.error]
        stats: dict[str, float] = {}
        for m in METRICS:
            x = np.array([getattr(r, m) for r in ok], dtype=np.float64)
            stats[f"{m}_mean"] = float(x.mean()) if len(x) else math.nan
            stats[f"{m}_std"] = float(x.std(ddof=1)) if len(x) > 1 else math.nan
        pub = next((p for p in published or [] if p.get("variant", v) == v and
                    p.get("train_dataset") == a and p.get("test_dataset", a) == b), None)
        rows.append(TableRow(v, a, b, len(ok), **stats, failed=len(rs) - len(ok),
                             published=pub))
    return rows


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _markdown(table: ExperimentTable) -> str:
    pub = any(r.published for r in table.rows)
    head = ["variant", "train", "test", "n", "SRCC", "PLCC", "KRCC", "RMSE"]
    if pub:
        head += ["published SRCC / PLCC", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [r.variant, r.train_dataset, r.test_dataset,
                 f"{r.n}" + (f" ({r.failed} failed)" if r.failed else "")]
        for m in METRICS:
            mean, std = getattr(r, f"{m}_mean"), getattr(r, f"{m}_std")
            cells.append(_fmt(mean) + (f" ± {_fmt(std)}" if not math.isnan(std) else ""))
        if pub:
            p = r.published or {}
            cells += [f"{_fmt(p.get('srcc'))} / {_fmt(p.get('plcc'))}" if p else "",
                      p.get("source", "")]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nMean ± sample standard deviation (ddof 1) over n runs; plan {table.plan}.\n")
    return "\n".join(lines) + "\n" + note


def _write_results(out: Path, runs: list[ResultRow]) -> None:
    with atomic_path(out / "results.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*RESULT_COLUMNS, "error"])
            w.writerows(r.to_csv() for r in runs)


def _write_table(out: Path, table: ExperimentTable) -> None:
    with atomic_path(out / "table.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(TABLE_COLUMNS)
            for r in table.rows:
                w.writerow([r.variant, r.train_dataset, r.test_dataset, r.n,
                            *["" if math.isnan(getattr(r, c)) else repr(getattr(r, c))
                              for c in TABLE_COLUMNS[4:]]])
    write_text(out / "table.md", table.to_markdown())


# -- cost --------------------------------------------------------------------------------------
def _timing(out: Path) -> dict[str, float]:
    f = out / "timing.json"
    try:
        return read_json(f) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def _add_timing(out: Path, key: str, seconds: float, units: float) -> None:
    t = _timing(out)
    t[f"{key}_seconds"] = t.get(f"{key}_seconds", 0.0) + seconds
    t[f"{key}_units"] = t.get(f"{key}_units", 0.0) + units
    write_json(out / "timing.json", t)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _cost(plan: Plan, out: Path, groups: list[Group], extractions, sizes: dict[str, int]
          ) -> list[str]:
    runs = sum(len(g.runs) for g in groups)
    pending = [(g, r) for g in groups for r in g.pending()]
    evals = sum(len(g.runs) * len(g.cross) for g in groups)
    missing = [e for e in extractions if not e[3]]
    lines = [f"plan {plan.name} ({plan.source}) -> {out}",
             f"  runs: {runs} in {len(groups)} groups ({len(plan.datasets)} data sets x "
             f"{len(plan.variants)} variants x {plan.runs_per_group} seeds); "
             f"{runs - len(pending)} finished, {len(pending)} to train"
             + (f"; {evals} cross evaluations" if evals else ""),
             f"  extractions: {len(extractions)} needed, {len(extractions) - len(missing)} "
             f"already cached"
             + (f" (to extract: {', '.join(f'{c.name} on {d.name}' for c, d, _, _ in missing)})"
                if missing else "")]
    t = _timing(out)
    train_units = sum(sizes.get(g.dataset, 0) * g.fit.epochs for g, _ in pending)
    extract_units = sum(sizes.get(d.name, 0) for _, d, _, _ in missing)
    estimate, unknown = 0.0, False
    for key, units in (("train", train_units), ("extract", extract_units)):
        if units == 0:
            continue
        if t.get(f"{key}_units"):
            estimate += units * t[f"{key}_seconds"] / t[f"{key}_units"]
        else:
            unknown = True
    if unknown:
        lines.append("  estimated time: unknown (nothing measured in this folder yet)")
    else:
        lines.append(f"  estimated time: {_duration(estimate)} (from the throughput measured "
                     f"in {out})")
    return lines


# -- the command -------------------------------------------------------------------------------
def experiment(plan: str | os.PathLike | Plan | ExperimentConfig, out: str | os.PathLike |
               None = None, *, log: Callable[[str], None] | None = None, **options: Any
               ) -> ExperimentTable | None:
    """Run a plan into ``out`` (``agiqa experiment PLAN --out DIR``); returns the table.

    ``plan`` is a TOML file, a built-in plan's name or a loaded :class:`Plan`, and the options
    are the fields of :class:`~agiqa.stages.configs.ExperimentConfig` (``roots``,
    ``overrides``, ``resume``, ``dry_run``, ``device``, ``concurrent_runs``, ``engine``,
    ``ray_address``, ``reports``, ``progress``), checked as the command line checks its flags;
    or ``plan`` is that config whole. ``log`` takes the progress lines (default: stderr).

    Finished runs are read back (their folders untouched), interrupted ones finished with
    ``resume``; a run that fails is a row with its error and the others go on. A plan that
    changes or drops runs of an earlier invocation in ``out`` is refused; one that only adds
    runs goes on. ``dry_run`` prints the cost (runs, extractions, estimated time) and returns
    None.

    ``engine="ray"`` runs each group as one task on a Ray cluster (``ray_address``: as
    ``extract-semantics --ray-address``), one GPU or one CPU slot each; the output is that of a
    local run, and every node must see ``out``, the images and the caches at the same paths.
    """
    from tqdm.auto import tqdm

    if isinstance(plan, ExperimentConfig):
        if out is not None or options:
            raise ConfigError("give an ExperimentConfig or its fields as keywords, not both")
        cfg = plan
    else:
        check_known(ExperimentConfig, options, "experiment")
        cfg = ExperimentConfig(plan=plan, out=out, **options)
    if cfg.plan is None or cfg.out is None:
        raise UsageError(f"{spell('plan')} and {spell('out')} are required")
    plan, out = cfg.plan, Path(cfg.out)
    resume, dry_run, reports, progress = cfg.resume, cfg.dry_run, cfg.reports, cfg.progress
    engine, ray_address = cfg.engine, cfg.ray_address
    if engine == "ray" and not dry_run:  # before any work: Ray installed, the address answers
        from agiqa.pipeline.ray_engine import check_ray

        check_ray(ray_address)

    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not isinstance(plan, Plan):
        plan = load_plan(plan, cfg.overrides, cfg.roots)
    if out.exists() and not out.is_dir():
        raise PlanError(f"{plan.source}: {spell('out')} {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.json").is_file():
        raise PlanError(f"{plan.source}: {spell('out')} {out} is not empty and holds no experiment "
                        "(plan.json); choose a new or empty folder")
    groups = plan_groups(plan, out, cfg.device, cfg.concurrent_runs)
    ids: dict[str, str] = {}
    for g in groups:
        ids.update(_identity(plan, g))
    _check_against_previous(plan, out, ids)
    datasets = _dataset_paths(plan, out)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        _ensure_data(plan, out, datasets)
    sizes = {}
    for name, ds in datasets.items():
        try:
            sizes[name] = len(_load_ds(ds, False))
        except AgiqaError as e:
            if not (dry_run and ds.generate):
                raise PlanError(f"{plan.source}: datasets.{name}: {e}") from None
            from agiqa.pipeline.demo import DEMO_SET

            sizes[name] = len(DEMO_SET) * ds.crops * 6  # what _ensure_data will make
    extractions = _needed_extractions(plan, out, datasets)
    for line in _cost(plan, out, groups, extractions, sizes):
        say(line)
    if dry_run:
        return None
    write_json(out / "plan.json", {"plan": plan.name, "source": plan.source, "runs": {
        **(read_json(out / "plan.json").get("runs", {}) if (out / "plan.json").is_file()
           else {}), **ids}})

    for spec, ds, path, done in extractions:
        if done:
            continue
        say(f"extract-semantics: {spec.name} on {ds.name} -> {path}")
        t0 = time.perf_counter()
        _extract(spec, ds, path, out, progress)
        _add_timing(out, "extract", time.perf_counter() - t0, sizes[ds.name])

    total = sum(len(g.runs) for g in groups)
    finished = sum(len(g.runs) - len(g.pending()) for g in groups)
    pending = [{str(r.run_dir) for r in g.pending()} for g in groups]
    by_group: dict[int, list[ResultRow]] = {}
    bar = tqdm(total=total, initial=finished, desc=f"experiment {plan.name}", unit="run",
               disable=not progress, file=sys.stderr)

    def done(i: int, rows: list[ResultRow], seconds: float) -> None:
        g, todo = groups[i], len(pending[i])
        if todo:
            _add_timing(out, "train", seconds, sizes[g.dataset] * g.fit.epochs * todo)
        for r in rows:
            if r.test_dataset == g.dataset and r.run_dir in pending[i]:
                shown = f"error: {r.error}" if r.error else \
                    f"SRCC {r.srcc:.4f}  PLCC {r.plcc:.4f}"
                say(f"{r.variant} {r.train_dataset} seed {r.seed}: {shown}")
        bar.update(todo)
        by_group[i] = rows  # the rows in plan order, whatever order the groups finish in
        _write_results(out, [r for j in sorted(by_group) for r in by_group[j]])

    try:
        if engine == "ray":
            from agiqa.pipeline.ray_engine import groups_on_ray

            seen = [ds.root for ds in datasets.values()] + [p for _, _, p, _ in extractions]
            groups_on_ray(groups, resume, plan, reports, out, seen, ray_address, done)
        else:
            for i, g in enumerate(groups):
                t0 = time.perf_counter()
                rows = run_group(g, resume, plan, reports)
                done(i, rows, time.perf_counter() - t0)
    finally:
        bar.close()
    runs = [r for j in sorted(by_group) for r in by_group[j]]
    table = ExperimentTable(out, plan.name, summarise(runs, plan.published), runs)
    _write_table(out, table)
    from agiqa.report.experiment import write_experiment_report

    write_experiment_report(table, out / "report.html")
    return table
