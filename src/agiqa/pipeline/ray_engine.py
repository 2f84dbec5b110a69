"""Stage one, scoring and experiment plans on a Ray cluster (``--engine ray``).

Stage one and scoring run on a fixed pool of actors, the work handed out one unit at a time as
actors free up; an experiment plan runs each of its groups (data set × variant) as one Ray task.

* Each actor loads the model once and runs its own loader processes; the driver (this process)
  plans the work exactly as a local run does, hands out one unit (a planned shard of stage one, a
  slice of the images to score) to each free actor, and keeps the progress and the summary.
* A unit is written whole and atomically by the actor that runs it, as in a local run. If an
  actor or its node dies, its unfinished unit goes to another actor; a shard the dead actor had
  already published (its file replaced) is not computed again, so nothing is written twice.
* Every node must see the cache, the images and the output at the same paths. Before any work,
  each actor checks the driver's probe file and writes its own there; a node that does not share
  the path is refused in one line that names it.
* An experiment group is one task holding one GPU (one CPU slot on a cluster without GPUs); it
  runs :func:`agiqa.pipeline.experiment.run_group` into the shared output, as a local run does.
  A task lost with its node is submitted again and finishes its runs from their last checkpoint
  (``--resume``).

Ray is an optional dependency (``pip install "agiqa[ray]"``), imported only here and only when
``--engine ray`` is asked for.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from agiqa.errors import AgiqaError, ConfigError
from agiqa.options import spell

__all__ = ["ENGINES", "ClusterError", "check_ray", "extract_on_ray", "groups_on_ray", "import_ray",
           "ray_session", "score_on_ray"]

ENGINES = ("local", "ray")
INSTALL = 'pip install "agiqa[ray]"'
CONNECT_TIMEOUT_S = 10.0
PROBE = ".agiqa-probe-"


class ClusterError(AgiqaError):
    """The Ray cluster cannot be joined, or cannot run the work (no actor left, a node that does
    not share the paths)."""


def import_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{spell('engine', 'ray')} needs Ray, which is not installed: "
                          f"{INSTALL}") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address to probe with a plain TCP connection (None: nothing to
    probe, e.g. ``auto`` or ``local``)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_ray(address: str | None):
    """The ``ray`` module, once Ray is found installed and ``address`` (if it names a host and
    port) answers; else one line saying which is not so."""
    ray = import_ray()
    target = _host_port(address) if address else None
    if target is not None:  # ray.init can wait minutes on an address nobody answers
        try:
            socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: "
                               f"{e.strerror or type(e).__name__}") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray joined for the run: ``auto`` the cluster of this machine (or ``$RAY_ADDRESS``), an
    address that cluster, None the cluster of ``$RAY_ADDRESS`` if set, else a local instance
    started for the run and stopped after it. A connection the caller already holds
    (``ray.init`` done beforehand) is used as it is and left open."""
    ray = check_ray(address)
    if ray.is_initialized():
        yield ray
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # not a cluster that happens to run on this machine
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=False)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# -- the pool --------------------------------------------------------------------------------
def _actor_failures(ray) -> tuple[type[BaseException], ...]:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "ActorDiedError",
                                         "ActorUnavailableError", "WorkerCrashedError",
                                         "NodeDiedError", "OwnerDiedError",
                                         "LocalRayletDiedError") if hasattr(ex, n))


def _unwrap(ray, error: BaseException) -> BaseException:
    """The exception an actor raised (an AgiqaError keeps its one line)."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return error


def run_pool(ray, actors: list, units: list[Any], call: Callable[[Any, Any], Any],
             done: Callable[[int, Any, Any], None],
             recover: Callable[[Any], Any | None] | None = None) -> tuple[list[Any], list[str]]:
    """Hand ``units`` out to ``actors`` one at a time, as each frees up.

    ``call(actor, unit)`` starts a unit (an object ref); ``done(actor index, unit, result)``
    is called once per finished unit, after the freed actor has its next one. When an actor
    dies, ``recover(unit)`` may return the result of the work it already published (else None)
    and the unit is otherwise handed to another actor. Returns the units handed out again
    and the actors lost (as ``actor N``).
    """
    failures = _actor_failures(ray)
    queue: deque = deque(units)
    idle = list(range(len(actors)))
    running: dict[Any, tuple[int, Any]] = {}
    reassigned: list[Any] = []
    lost: list[str] = []
    while queue or running:
        while idle and queue:
            a = idle.pop(0)
            unit = queue.popleft()
            running[call(actors[a], unit)] = (a, unit)
        if not running:
            raise ClusterError(f"every actor of the pool died ({', '.join(lost)}); "
                               f"{len(queue)} unit(s) of work were left; run it again to finish")
        ready, _ = ray.wait(list(running), num_returns=1)
        a, unit = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except failures:
            lost.append(f"actor {a}")
            ray.kill(actors[a], no_restart=True)  # it must not write anything more
            published = recover(unit) if recover is not None else None
            if published is not None:
                done(a, unit, published)
            else:
                reassigned.append(unit)
                queue.appendleft(unit)
            continue
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(ray, e) from None
        idle.append(a)
        while idle and queue:  # the freed actor gets its next unit before `done` runs
            b = idle.pop(0)
            nxt = queue.popleft()
            running[call(actors[b], nxt)] = (b, nxt)
        done(a, unit, result)
    return reassigned, lost


def _pool_size(ray, workers: int | None, device: str) -> tuple[int, dict[str, float]]:
    """The actors to start and the resources each holds: one per GPU of the cluster (when the
    device is not the CPU and the cluster has GPUs), else ``workers`` or one per node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device != "cpu" and gpus > 0:
        return workers or gpus, {"num_gpus": 1}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU"))
    return workers or max(1, nodes), {"num_cpus": 1}


def _start_actors(ray, cls: type, n: int, resources: dict[str, float], *args) -> list:
    """``n`` actors of ``cls`` (index, *args), spread over the nodes, never restarted: the
    driver hands a dead actor's unit to another."""
    remote = ray.remote(cls).options(max_restarts=0, max_task_retries=0,
                                     scheduling_strategy="SPREAD", **resources)
    return [remote.remote(i, *args) for i in range(n)]


def _probe(ray, actors: list, folder: Path, images: Path | list[Path]) -> list[dict[str, Any]]:
    """Each actor checks the driver's probe file in ``folder`` and writes its own; a node that
    does not share ``folder`` (or does not see the folder(s) ``images``) is refused by name."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    mine = folder / f"{PROBE}{token}"
    mine.write_text(token)
    try:
        seen = [str(p) for p in images] if isinstance(images, list) else str(images)
        answers = _get(ray, [a.probe.remote(str(folder), token, seen) for a in actors])
        for answer in answers:
            theirs = folder / f"{PROBE}{token}-{answer['actor']}"
            node = f"{answer['ip']} ({answer['node'][:12]})"
            if answer["missing"] or not theirs.is_file():
                path = answer["missing"] or str(folder)
                raise ClusterError(f"node {node} does not see {path} as this machine does: "
                                   "the cache, the images and the output must be on a "
                                   "filesystem every node shares at the same path")
    except BaseException:
        _unprobe(folder, token)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a refused run leaves nothing behind
        raise
    _unprobe(folder, token)
    return answers


def _unprobe(folder: Path, token: str) -> None:
    for p in folder.glob(f"{PROBE}{token}*"):
        p.unlink(missing_ok=True)


class _Worker:
    """What both actors share: who they are, and the probe of the shared paths."""

    def __init__(self, index: int):
        self.index = index
        self.failed: AgiqaError | None = None

    def probe(self, folder: str, token: str, images: str | list[str]) -> dict[str, Any]:
        import ray

        if self.failed is not None:  # the start's error (a model that does not load), whole
            raise self.failed

        ctx = ray.get_runtime_context()
        answer = {"actor": self.index, "node": ctx.get_node_id(),
                  "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "missing": None}
        mine = Path(folder) / f"{PROBE}{token}"
        unseen = [p for p in ([images] if isinstance(images, str) else images)
                  if not Path(p).is_dir()]
        if not (mine.is_file() and mine.read_text() == token):
            answer["missing"] = folder
        elif unseen:
            answer["missing"] = unseen[0]
        else:
            (Path(folder) / f"{PROBE}{token}-{self.index}").write_text(token)
        return answer


# -- stage one -------------------------------------------------------------------------------
class _ExtractActor(_Worker):
    """One MLLM, loaded once; computes and writes the shards it is handed."""

    def __init__(self, index: int, cfg, root: str):
        from agiqa.models.mllm import SemanticEncoder
        from agiqa.presets import load_prompts
        from agiqa.stages.extraction.extract import default_loader_workers

        super().__init__(index)
        self.cfg, self.root = cfg, Path(root)
        self.cache = None
        try:
            self.encoder = SemanticEncoder(
                cfg.mllm, load_prompts(cfg.prompts), revision=cfg.revision, device=cfg.device,
                dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation, pad_square=cfg.pad_square,
                fuse_prompts=cfg.fuse_prompts, compile=cfg.compile)
        except AgiqaError as e:
            self.failed = e
            return
        self.loader_workers = (default_loader_workers(self.encoder.device)
                               if cfg.loader_workers is None else cfg.loader_workers)

    def spec(self) -> tuple[dict[str, Any], list[str], int]:
        """The semantic spec as this node's model and device give it, the prompt names and the
        vector size; the weights are loaded next, before the first shard."""
        from agiqa.stages.extraction.extract import semantic_spec_of

        spec = semantic_spec_of(self.encoder)
        self.encoder.load(progress=False)
        return spec, self.encoder.prompts.names, self.encoder.dim

    def run(self, job) -> dict[str, Any]:
        from agiqa.cache import SemanticCache
        from agiqa.stages.extraction.extract import ExtractReport, compute_shards, semantic_spec_of

        if self.cache is None:  # the driver created it; this opens it and checks the spec
            self.cache = SemanticCache.create(self.cfg.out, semantic_spec_of(self.encoder),
                                              self.encoder.prompts.names, self.encoder.dim,
                                              self.cfg.format, root=self.root)
        report = ExtractReport(str(self.cfg.out), 0, loader_workers=self.loader_workers)
        compute_shards(self.cfg, self.cache, self.encoder, self.root, [job], report)
        return {"computed": report.computed, "computed_keys": sorted(report.computed_keys),
                "shards": report.shards_written,
                "forward_passes": report.forward_passes, "model_calls": report.model_calls,
                "tokens": report.tokens, "padding_tokens": report.padding_tokens}


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def extract_on_ray(cfg, source, on_shard: Callable[[str, str], None] | None = None):
    """Stage one on a Ray cluster; the same cache as a local run (:func:`extract_semantics`).

    ``cfg.workers``: the actors (default: one per GPU of the cluster, or one per node on a
    CPU-only cluster). ``on_shard(shard name, probe answer of its actor)`` is called by the
    driver after each written shard (the answer names the actor's node and process).
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    from agiqa.cache import SemanticCache
    from agiqa.stages.extraction.extract import ExtractReport, settle_counts
    from agiqa.stages.extraction.resume import discard_damaged, plan_resume

    if cfg.worker is not None:
        raise ConfigError(f"{spell('worker')} is the static split's; with "
                          f"{spell('engine', 'ray')} the driver hands the shards out "
                          f"({spell('workers')}: the number of actors)")
    start = time.perf_counter()
    out, root = Path(cfg.out).resolve(), Path(source.root).resolve()
    report = ExtractReport(str(cfg.out), len(source.keys), skipped_files=list(source.skipped),
                           engine="ray")
    with ray_session(cfg.ray_address) as ray:
        report.engine_seconds["joined"] = round(time.perf_counter() - start, 3)
        n, resources = _pool_size(ray, cfg.workers, cfg.device)
        # A local MLLM folder is named by its absolute path: an actor's working folder is not
        # the driver's (the identity records the absolute path either way).
        mllm = str(Path(cfg.mllm).resolve()) if Path(cfg.mllm).exists() else cfg.mllm
        actor_cfg = replace(cfg, out=out, mllm=mllm, progress=False, workers=None, worker=None)
        actors = _start_actors(ray, _ExtractActor, n, resources, actor_cfg, str(root))
        try:
            probed = _probe(ray, actors, out, root)
            # The spec as the actors' model and device give it (the driver may have no GPU);
            # every node must find the same model.
            specs = _get(ray, [a.spec.remote() for a in actors])
            spec, names, dim = specs[0]
            for (other, _, _), p in zip(specs, probed, strict=True):
                if other != spec:
                    raise ClusterError(f"node {p['ip']} finds another MLLM {cfg.mllm} than "
                                       f"node {probed[0]['ip']} (revision, dtype or files "
                                       "differ)")
            cache = SemanticCache.create(out, spec, names, dim, cfg.format, root=root)
            plan = plan_resume(cache, source.keys, root, cfg.shard_size, 0, 1,
                               cfg.retry_failed)
            report.workers = n
            report.reused, report.changed, report.retried = (plan.reused, plan.changed,
                                                             plan.retried)
            report.damaged_shards = plan.damaged
            discard_damaged(cache, plan)
            report.engine_seconds["actors_ready"] = round(time.perf_counter() - start, 3)
            if plan.jobs:
                _run_extraction(ray, actors, probed, cache, plan.jobs, report, cfg.progress,
                                on_shard, tqdm)
            report.engine_seconds["shards"] = round(
                time.perf_counter() - start - report.engine_seconds["actors_ready"], 3)
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
    cache.refresh()
    cache._rewrite_manifest()  # the summary of every shard, whatever order the actors wrote
    settle_counts(report, cache, source.keys)
    report.seconds = time.perf_counter() - start
    return report


def _get(ray, refs: list) -> list:
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise _unwrap(ray, e) from None
    except _actor_failures(ray) as e:
        cause = getattr(e, "cause", None)  # an error of the actor's start: the model's, say
        if isinstance(cause, ray.exceptions.RayTaskError):
            cause = _unwrap(ray, cause)
        if isinstance(cause, AgiqaError):
            raise cause from None
        raise ClusterError(f"an actor died before any work: {str(e).splitlines()[0]}") from None


def _run_extraction(ray, actors, probed, cache, jobs, report, progress, on_shard, tqdm) -> None:
    by_name = {job.name: job for job in jobs}
    before = {job.name: _signature(cache.shard_path(job.name)) for job in jobs}
    names = [f"actor {p['actor']} on {p['ip']}" for p in probed]
    report.actors = {name: {"shards": 0, "images": 0} for name in names}
    report.loader_workers = 0
    bar = tqdm(total=sum(len(j.compute) for j in jobs), unit="img",
               desc="extract-semantics (ray)", disable=not progress, dynamic_ncols=True)

    def call(actor, job):
        return actor.run.remote(job)

    def done(a: int, job, result: dict[str, Any]) -> None:
        report.computed_keys.update(result["computed_keys"])  # counted by settle_counts
        report.shards_written += result["shards"]
        for k in ("forward_passes", "model_calls", "tokens", "padding_tokens"):
            setattr(report, k, getattr(report, k) + result.get(k, 0))
        report.actors[names[a]]["shards"] += 1
        report.actors[names[a]]["images"] += result["computed"]
        bar.update(len(job.compute))
        if on_shard is not None:
            on_shard(job.name, probed[a])

    def recover(job):
        """The shard's new version, if the dead actor published it before it died."""
        if _signature(cache.shard_path(job.name)) in (before[job.name], None):
            return None
        return {"computed": len(job.compute), "shards": 1}

    try:
        reassigned, _ = run_pool(ray, actors, list(by_name.values()), call, done, recover)
    finally:
        bar.close()
    report.reassigned = [job.name for job in reassigned]


# -- scoring ---------------------------------------------------------------------------------
class _ScoreActor(_Worker):
    """One trained model and its MLLM, loaded once; scores the slices it is handed."""

    def __init__(self, index: int, model: str, cache_dir: str, kwargs: dict[str, Any]):
        from agiqa.stages.scoring.scorer import Scorer

        super().__init__(index)
        try:
            self.scorer = Scorer.from_pretrained(model, cache_dir=cache_dir, **kwargs)
        except AgiqaError as e:
            self.failed = e

    def run(self, part: tuple[list, list[str], str | None]):
        from agiqa.stages.scoring.results import ScoreReport

        items, keys, root = part
        report = ScoreReport()
        self.scorer.score_keyed([(label, Path(p)) for label, p in items], keys,
                                None if root is None else Path(root), report)
        return report


def score_on_ray(cfg, on_part: Callable[[int, dict[str, Any]], None] | None = None):
    """``score-folder`` on a Ray cluster: slices of ``cfg.shard_size`` images handed out to a
    pool of actors; the driver gathers the rows in the order a local run writes them."""
    from tqdm.auto import tqdm

    from agiqa.cache import MANIFEST, open_cache
    from agiqa.data.images import list_images
    from agiqa.stages.scoring.results import ScoreReport
    from agiqa.stages.scoring.scorer import Scorer

    folder = Path(cfg.folder).resolve()
    if not folder.is_dir():
        raise ConfigError(f"{cfg.folder}: not a folder of images")
    kwargs = dict(device=cfg.device, batch_size=cfg.batch_size,
                  loader_workers=cfg.loader_workers, progress=False, amp=cfg.amp,
                  revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    # The driver lists, keys and orders the images as a local run does; the actors compute.
    scorer = Scorer.from_pretrained(cfg.model, cache_dir=cfg.cache,
                                    **{**kwargs, "device": "cpu"})
    provider = scorer.vectors
    cache_dir = provider.cache_dir.resolve()
    keys_list, others = list_images(folder, cfg.recursive, exclude=cache_dir)
    items = [(k, folder / k) for k in keys_list]
    report = ScoreReport(skipped_files=others)
    root = provider.key_root(items, folder)
    keys = provider.keys(items, root, report)
    # Slices of the listed images, as a local run cuts them into chunks of CHUNK: at the
    # default size each slice is one of its chunks, and the model sees the same batches. A key
    # is in one slice only: equal files (content keys) are computed once, as locally.
    first: dict[str, int] = {}
    parts: list[list[tuple[str, str, str]]] = []
    for start in range(0, len(items), cfg.shard_size):
        part = []
        for (label, path), key in zip(items[start:start + cfg.shard_size],
                                      keys[start:start + cfg.shard_size], strict=True):
            if key is None:
                continue  # its failure is in the report already
            at = first.setdefault(key, len(parts))
            (part if at == len(parts) else parts[at]).append((label, str(path), key))
        if part:
            parts.append(part)
    todo = sum(len(p) for p in parts)
    if parts:
        with ray_session(cfg.ray_address) as ray:
            n, resources = _pool_size(ray, cfg.workers, cfg.device)
            actors = _start_actors(ray, _ScoreActor, n, resources, str(Path(cfg.model).resolve()),
                                   str(cache_dir), kwargs)
            probed = _probe(ray, actors, cache_dir, folder)
            units = [([(lab, p) for lab, p, _ in part], [k for _, _, k in part],
                      None if root is None else str(root)) for part in parts]
            index = {id(u): i for i, u in enumerate(units)}
            results: dict[int, ScoreReport] = {}
            bar = tqdm(total=todo, unit="img", desc="score-folder (ray)",
                       disable=not cfg.progress, dynamic_ncols=True)

            def done(a: int, unit, result) -> None:
                results[index[id(unit)]] = result
                bar.update(len(unit[0]))
                if on_part is not None:
                    on_part(index[id(unit)], probed[a])

            try:
                reassigned, _ = run_pool(ray, actors, units, lambda a, u: a.run.remote(u), done)
            finally:
                bar.close()
            for a in actors:
                ray.kill(a, no_restart=True)
        for i in sorted(results):
            part = results[i]
            report.rows += part.rows
            report.failures.update(part.failures)
            report.computed += part.computed
            report.changed += part.changed
        report.reassigned = len(reassigned)
        order = {label: i for i, (label, _) in enumerate(items)}
        report.rows.sort(key=lambda row: order[row["path"]])
        report.failures = dict(sorted(report.failures.items(), key=lambda kv: order.get(kv[0], 0)))
        if (cache_dir / MANIFEST).is_file():
            cache = open_cache(cache_dir)
            if os.access(cache_dir, os.W_OK):
                cache._rewrite_manifest()
    return report


# -- experiment plans ------------------------------------------------------------------------
# How often one group may lose its node before the run stops (then: run it again to finish).
GROUP_RERUNS = 3


def _task_failures(ray) -> tuple[type[BaseException], ...]:
    """What a task lost with its worker or node raises (its own errors come as RayTaskError)."""
    ex = ray.exceptions
    more = tuple(getattr(ex, n) for n in ("ObjectLostError", "TaskUnschedulableError")
                 if hasattr(ex, n))
    return _actor_failures(ray) + more


def _group_task(group, resume: bool, plan, reports: bool,
                on_start: Callable[[Any, dict[str, Any]], None] | None):
    """One group, run where Ray placed it: its rows and the seconds it took."""
    import ray

    from agiqa.pipeline.experiment import run_group

    if on_start is not None:
        ctx = ray.get_runtime_context()
        on_start(group, {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                         "pid": os.getpid()})
    start = time.perf_counter()
    rows = run_group(group, resume, plan, reports)
    return rows, time.perf_counter() - start


def groups_on_ray(groups: list, resume: bool, plan, reports: bool, out: Path,
                  seen: list[Path], address: str | None,
                  done: Callable[[int, list, float], None],
                  on_start: Callable[[Any, dict[str, Any]], None] | None = None) -> list[int]:
    """Run an experiment's groups on a Ray cluster, one task each; ``done(index, rows,
    seconds)`` is called by the driver as each group finishes (in any order).

    Each task holds one GPU when the cluster has GPUs and the groups do not ask for the CPU,
    else one CPU slot. Before any work, every node must see ``out`` and the folders ``seen``
    (images, caches) as this machine does. A task lost with its node is submitted again with
    ``resume``: its runs go on from their last checkpoint. ``on_start(group, node)`` runs in
    the task before the group (the node's id and address, the worker's pid). Returns the
    indices of the groups submitted again.
    """
    devices = {g.fit.device for g in groups}
    with ray_session(address) as ray:
        n, resources = _pool_size(ray, None, "cpu" if devices == {"cpu"} else "auto")
        probes = _start_actors(ray, _Worker, n, resources)
        try:
            _probe(ray, probes, Path(out).resolve(), [Path(p).resolve() for p in seen])
        finally:
            for a in probes:
                ray.kill(a, no_restart=True)
        task = ray.remote(_group_task).options(max_retries=0, **resources)
        running = {task.remote(g, resume, plan, reports, on_start): i
                   for i, g in enumerate(groups)}
        reruns: dict[int, int] = {}
        try:
            _gather(ray, groups, running, task, (resume, plan, reports, on_start), reruns, done)
        finally:
            for ref in running:  # a group left running must not write after the driver stops
                with suppress(Exception):  # one that ended meanwhile
                    ray.cancel(ref, force=True)
    return sorted(reruns)


def _gather(ray, groups, running, task, args, reruns, done) -> None:
    resume, plan, reports, on_start = args
    lost = _task_failures(ray)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i = running.pop(ready[0])
        try:
            rows, seconds = ray.get(ready[0])
        except lost as e:
            reruns[i] = reruns.get(i, 0) + 1
            if reruns[i] > GROUP_RERUNS:
                g = groups[i]
                raise ClusterError(
                    f"group {g.variant} on {g.dataset} lost its node {GROUP_RERUNS + 1} "
                    f"times ({str(e).splitlines()[0]}); run the plan again with --resume "
                    "to finish it") from None
            # Its runs finish from their checkpoints, as ``--resume`` does.
            running[task.remote(groups[i], True, plan, reports, on_start)] = i
            continue
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(ray, e) from None
        done(i, rows, seconds)
