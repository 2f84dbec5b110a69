"""Shared fixtures: tiny MLLMs saved to folders, real photos in many formats, broken files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# One torch thread in each test process and in each process a test starts (unless
# OMP_NUM_THREADS says otherwise): on two shared cores, two OpenMP threads that wait for each
# other make a tiny training run several times slower, and `pytest -n 2` runs a process per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from agiqa.models.mllm.tiny import build_tiny_mllm  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, otherwise in file order: ``pytest -n 2`` hands tests out in this
    order, so the long ones start early and the short ones even out the workers' ends. Tests
    marked ``gpu`` are skipped where no CUDA device is visible."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """User state (the default score cache) lives under AGIQA_HOME: point it at tmp_path."""
    monkeypatch.setenv("AGIQA_HOME", str(tmp_path / "agiqa-home"))


@pytest.fixture
def deadline():
    """Fail a test that would hang instead of hanging the suite (240 s)."""
    def hung(*_):
        raise TimeoutError("the run hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def kill_loader_on(monkeypatch):
    """``kill_loader_on(marker)``: from now on, a process that reads an image file whose path
    holds ``marker`` is killed with SIGKILL, as the operating system kills a loader process
    out of memory (every stage reads files through ``agiqa.data.loader``)."""
    import agiqa.data.loader as loader

    def arm(marker: str = "kill_me") -> None:
        real = loader.read_image_bytes
        test_process = os.getpid()

        def read(path, name=None):
            if marker in str(path):
                # never the test's own process: that would end the test session, not a loader
                assert os.getpid() != test_process, f"{path} was read in the test's process"
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, name)

        monkeypatch.setattr(loader, "read_image_bytes", read)

    return arm


@pytest.fixture
def mllm_forwards(monkeypatch) -> list[int]:
    """Batch sizes of the MLLM forward passes while the test runs, counted by a hook on each
    loaded model's input embeddings (every language-model forward pass runs them once)."""
    from transformers import AutoModelForImageTextToText

    calls: list[int] = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        model.get_input_embeddings().register_forward_hook(
            lambda _module, _inputs, output: calls.append(output.shape[0]))
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(counting))
    return calls


@pytest.fixture
def vision_images(monkeypatch) -> list[int]:
    """Images per call of each loaded MLLM's vision tower while the test runs (a pre-hook on
    LLaVA's ``vision_tower`` or Qwen2-VL's ``visual``)."""
    from transformers import AutoModelForImageTextToText

    calls: list[int] = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def count(_module, args, kwargs):
        grid = kwargs.get("grid_thw")
        calls.append(int(grid.shape[0]) if grid is not None else int(args[0].shape[0]))

    def counting(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        tower = getattr(model.model, "vision_tower", None) or model.model.visual
        tower.register_forward_pre_hook(count, with_kwargs=True)
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(counting))
    return calls


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_mllm("llava", tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_mllm("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session", params=["llava", "qwen2-vl", "qwen2.5-vl"])
def tiny_mllm(request, tmp_path_factory) -> Path:
    if request.param == "llava":
        return request.getfixturevalue("tiny_llava")
    if request.param == "qwen2-vl":
        return request.getfixturevalue("tiny_qwen")
    return request.getfixturevalue("tiny_qwen25")


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory) -> Path:
    """Qwen2.5-VL at up to 112 × 112 px: its vision tower's 4 × 4-patch windows then come in
    several lengths (a 112 × 84 image has 8 × 6 patches: windows of 16 and of 8)."""
    return build_tiny_mllm("qwen2.5-vl", tmp_path_factory.mktemp("tiny-qwen2.5-vl"),
                           image_size=112)


def _real_photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (no download)."""
    import skimage.data as d

    return {"astronaut": d.astronaut(), "chelsea": d.chelsea(), "coffee": d.coffee(),
            "rocket": d.rocket(), "camera": d.camera()}


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _write_photo_folder(root: Path, with_broken: bool = True) -> dict[str, str]:
    """Write real photos in many formats and modes (and broken files). Returns key → kind."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    p = _real_photos()
    astro = Image.fromarray(p["astronaut"]).resize((96, 96))
    cat = Image.fromarray(p["chelsea"]).resize((120, 80))
    coffee = Image.fromarray(p["coffee"]).resize((90, 60))
    rocket = Image.fromarray(p["rocket"]).resize((64, 96))
    camera = Image.fromarray(p["camera"]).resize((80, 80))
    kinds = {}

    def save(key, img, fmt=None, **kw):
        img.save(root / key, fmt, **kw)
        kinds[key] = "ok"

    save("astronaut.jpg", astro, quality=90)
    save("chelsea.png", cat)
    save("coffee.webp", coffee)
    save("rocket.bmp", rocket)
    save("nested/camera_gray.png", camera)
    save("nested/astronaut.tiff", astro)
    save("nested/chelsea_palette.gif", cat.convert("P", palette=Image.ADAPTIVE))
    rgba = coffee.convert("RGBA")
    rgba.putalpha(128)
    save("nested/coffee_rgba.png", rgba)
    save("nested/deeper/rocket_cmyk.jpg", rocket.convert("CMYK"), quality=90)
    sixteen = (np.asarray(camera, dtype=np.uint16) * 257).astype(np.uint16)
    save("nested/deeper/camera_16bit.png", Image.fromarray(sixteen))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    (root / "nested/deeper/chelsea_exif.jpg").write_bytes(_jpeg_bytes(cat, exif=exif.tobytes()))
    kinds["nested/deeper/chelsea_exif.jpg"] = "ok"
    if with_broken:
        (root / "zero_bytes.png").write_bytes(b"")
        full = _jpeg_bytes(astro)
        (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
        (root / "text_as.jpg").write_text("this is not an image\n")
        (root / "notes.txt").write_text("a file that is not an image at all\n")
        kinds.update({"zero_bytes.png": "broken", "truncated.jpg": "broken",
                      "text_as.jpg": "broken", "notes.txt": "skipped"})
    return kinds


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("photos")
    return root, _write_photo_folder(root)


@dataclass(frozen=True)
class DemoRun:
    """A finished ``agiqa demo --json``: its folder, its JSON report and its wall time."""

    out: Path
    report: dict[str, Any]
    seconds: float


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """One demo per session (about a minute on two cores), shared by the demo's tests and by the
    documentation pages that run ``agiqa demo``: its folder holds ``tiny-llava/``, ``images/``
    (with ``labels.csv``), ``unseen/``, ``cache/``, ``run/``, ``evaluation-val/``,
    ``evaluation-test/`` and ``scores.csv``."""
    from click.testing import CliRunner

    from agiqa.cli import cli

    out = tmp_path_factory.mktemp("demo-session") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGIQA_HOME", str(tmp_path_factory.mktemp("demo-home")))
        start = time.perf_counter()
        r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--json"], catch_exceptions=False)
        seconds = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    return DemoRun(out, json.loads(r.stdout), seconds)


@pytest.fixture(scope="session")
def real_photos():
    """The function that returns real photographs shipped with scikit-image, by name."""
    return _real_photos


@pytest.fixture(scope="session")
def write_photo_folder():
    """The function that writes real photos in many formats and modes (and broken files) into a
    folder and returns key → kind (``ok``, ``broken``, ``skipped``)."""
    return _write_photo_folder


@pytest.fixture(scope="session")
def label_files(tmp_path_factory) -> Path:
    """The real label files of AGIQA-3K, AIGCIQA-20K and AIGCIQA2023, committed (gzip) under
    ``tests/data/labels`` and unpacked once per session under their own names:
    ``agiqa-3k/data.csv``, ``aigciqa-20k/info_train.csv``, ``aigciqa2023/AIGCIQA2023.csv`` …"""
    import gzip

    src = Path(__file__).parent / "data" / "labels"
    out = tmp_path_factory.mktemp("labels")
    for packed in src.glob("*/*.csv.gz"):
        (out / packed.parent.name).mkdir(exist_ok=True)
        (out / packed.parent.name / packed.name[:-3]).write_bytes(
            gzip.decompress(packed.read_bytes()))
    return out


@pytest.fixture(scope="session")
def graded(tmp_path_factory, tiny_llava):
    """Real photos blurred in 6 grades; MOS falls with blur. Extracted once per session."""
    from click.testing import CliRunner
    from PIL import ImageFilter

    from agiqa.cli import cli

    root = tmp_path_factory.mktemp("graded")
    rows = ["image,mos"]
    for name, arr in _real_photos().items():
        img = Image.fromarray(arr).convert("RGB").resize((160, 120))
        for b in range(6):
            img.filter(ImageFilter.GaussianBlur(1.5 * b)).save(root / f"{name}_{b}.jpg", quality=92)
            rows.append(f"{name}_{b}.jpg,{5 - 0.8 * b:.2f}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cache = root.parent / f"{root.name}-cache"
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", str(tiny_llava), "--dataset",
                                 "csv", "--root", str(root), "--out", str(cache), "-q",
                                 "--loader-workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root, cache


@pytest.fixture(scope="session")
def agiqa_cli():
    """``agiqa_cli(*args)``: the ``agiqa`` command line run in this process (click's
    CliRunner), arguments turned into strings, exceptions not caught; returns the result."""
    from click.testing import CliRunner

    from agiqa.cli import cli

    def invoke(*args, catch_exceptions: bool = False):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)

    return invoke


@pytest.fixture
def decoded_names(monkeypatch) -> list[str]:
    """The names of the images decoded while the test runs (every stage decodes through
    ``agiqa.data.loader``; a pixel-cache hit decodes nothing)."""
    import agiqa.data.loader as loader

    names: list[str] = []
    real = loader.decode_image

    def counting(data, name):
        names.append(name)
        return real(data, name)

    monkeypatch.setattr(loader, "decode_image", counting)
    return names


@pytest.fixture(scope="module")
def owl2(tmp_path_factory) -> tuple[Path, Path]:
    """Copies of the committed tiny mPLUG-Owl2 checkpoint and photos (nothing writes into the
    repository): ``(checkpoint folder, image folder)``."""
    import shutil

    fixture = Path(__file__).parent / "fixtures" / "mplug_owl2"
    base = tmp_path_factory.mktemp("owl2")
    shutil.copytree(fixture / "checkpoint", base / "ckpt")
    shutil.copytree(fixture / "images", base / "images")
    return base / "ckpt", base / "images"


# An image name that would inject markup and a script if a page did not escape it.
TRICKY_NAME = "x<img src=q onerror=alert(1)>&amp;\"quote'\nline.png"


@pytest.fixture(scope="session")
def tricky_name() -> str:
    """A file name that would inject markup and a script if a page did not escape it (a
    newline included)."""
    return TRICKY_NAME


def _make_images(folder: Path, names: list[str], size: tuple[int, int] = (96, 64),
                 seed: int = 0) -> None:
    """Smooth random colour images (PNG or JPEG by suffix) under ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / name)


@pytest.fixture(scope="session")
def make_images():
    """``make_images(folder, names, size=(96, 64), seed=0)``: smooth random colour images."""
    return _make_images


def _make_run(folder: Path, root: Path, n: int = 10, dataset: str = "csv", target: str = "mos",
              names: list[str] | None = None, seed: int = 0) -> Path:
    import csv

    import torch

    from agiqa.models.agiqa_net import create_model, save_model

    names = names or [f"img_{i:02d}.png" for i in range(n)]
    _make_images(root, names, seed=seed)
    torch.manual_seed(seed)
    model = create_model("tiny", num_prompts=2, semantic_dim=8, pretrained=False)
    save_model(model, folder, {
        "prompt_names": ["semantic_content", "coherence"],
        "dataset": {"name": dataset, "target": target, "split": "random"},
        "training": {"root": str(root), "cache": None, "labels": None},
    })
    rng = np.random.default_rng(seed)
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "subset", "mos", "score", "gate_semantic_content", "gate_coherence",
                    "gate_image"])
        for i, name in enumerate(names):
            mos, err = rng.uniform(1, 5), rng.normal(0, 0.7)
            gates = rng.normal(0.4, 0.3, 3)
            w.writerow([name, "test" if i % 2 == 0 else "train", f"{mos:.4f}",
                        f"{mos + err:.4f}", *[f"{g:.4f}" for g in gates]])
    history = [{"epoch": e, "loss": 2.0 / (e + 1), "val_srcc": 0.5 + 0.05 * e,
                "val_plcc": 0.55 + 0.04 * e} for e in range(4)]
    (folder / "metrics.json").write_text(json.dumps({
        "test": {"srcc": 0.61, "plcc": 0.66, "krcc": 0.45, "rmse": 0.71},
        "best_epoch": 3, "history": history}))
    return folder


@pytest.fixture(scope="session")
def make_run():
    """``make_run(folder, root, n=10, dataset="csv", target="mos", names=None, seed=0)``: a
    finished-looking run folder built directly (no MLLM, no training): a tiny random model,
    ``n`` images under ``root`` (half in the test subset) and made-up predictions and metrics;
    for the checks of what a report may read and write, where the numbers mean nothing."""
    return _make_run


def _synthetic_scores(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        g = rng.normal(0.4, 0.3, 3)
        rows.append({"path": f"img_{i:05d}.png", "score": float(rng.normal(3.0, 0.8)),
                     "gate_semantic_content": float(g[0]), "gate_coherence": float(g[1]),
                     "gate_image": float(g[2]), "zero_shot": float(rng.uniform(1, 5))})
    return rows


@pytest.fixture(scope="session")
def synthetic_scores():
    """``synthetic_scores(n, seed=0)``: ``n`` random rows in score-folder's columns (names
    ``img_00000.png`` …), for the bounds of a score page of thousands of images, which no
    test can afford to score."""
    return _synthetic_scores


@dataclass(frozen=True)
class ReportData:
    """An AGIQA-3K-shaped data set of generated images (one with :data:`TRICKY_NAME`), its
    stage-one cache (a tiny LLaVA) and its split file (the tricky name in the test subset)."""

    root: Path
    cache: Path
    split: Path
    names: list[str]
    test: list[str]


@pytest.fixture(scope="session")
def report_data(tmp_path_factory, tiny_llava, agiqa_cli) -> ReportData:
    import csv

    base = tmp_path_factory.mktemp("report-data")
    root = base / "images"
    names = [TRICKY_NAME] + [f"img_{i:02d}.png" for i in range(13)]
    _make_images(root, names)
    rng = np.random.default_rng(0)
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "prompt", "mos_quality", "mos_align"])
        for name in names:
            w.writerow([name, "a picture", f"{rng.uniform(1, 5):.3f}", f"{rng.uniform(1, 5):.3f}"])
    subsets = ["test"] * 5 + ["train"] * 5 + ["val"] * 4  # the tricky name is a test image
    with open(base / "split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "subset"])
        w.writerows(zip(names, subsets, strict=True))
    cache = base / "cache"
    r = agiqa_cli("extract-semantics", "--model", tiny_llava, "--dataset", "agiqa-3k", "--root",
                  root, "--out", cache, "-q", "--loader-workers", "0")
    assert r.exit_code == 0, r.output
    return ReportData(root, cache, base / "split.csv", names,
                      [n for n, s in zip(names, subsets, strict=True) if s == "test"])


def _report_fit(factory, data: ReportData, agiqa_cli, target: str) -> Path:
    out = factory.mktemp(f"report-run-{target}") / "run"
    with pytest.MonkeyPatch.context() as mp:  # its pixel cache is the test's, not the user's
        mp.setenv("AGIQA_HOME", str(factory.mktemp("report-home")))
        r = agiqa_cli("fit", "--dataset", "agiqa-3k", "--root", data.root, "--target", target,
                      "--cache", data.cache, "--split", data.split, "--backbone", "tiny",
                      "--no-pretrained", "--epochs", "2", "--batch-size", "2",
                      "--loader-workers", "0", "-q", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, report_data, agiqa_cli) -> Path:
    """A real ``fit`` run on :func:`report_data` (backbone ``tiny``, 2 epochs), made once per
    session: what the report tests read."""
    return _report_fit(tmp_path_factory, report_data, agiqa_cli, "mos_quality")


@pytest.fixture(scope="session")
def report_run_align(tmp_path_factory, report_data, agiqa_cli) -> Path:
    """The same run trained on AGIQA-3K's other target, ``mos_align``."""
    return _report_fit(tmp_path_factory, report_data, agiqa_cli, "mos_align")


MA_AGIQA_FIXTURE = Path(__file__).parent / "fixtures" / "ma_agiqa"
# agiqa's module for each official module the fixture hooks: MANIQA's keep their official names
# under `backbone.`, the MoE head's are renamed.
AGIQA_MODULE = {"fc784_784": "head.image_expert", "fc4096_784_a2": "head.semantic_experts.0",
                "fc4096_784_b2": "head.semantic_experts.1", "gating": "head.gating",
                "output_fc": "head.output"}


class OfficialMaAgiqa:
    """What the official MA-AGIQA module computed (``tests/fixtures/ma_agiqa``, written by its
    ``generate.py`` in the official environment), and its state dict rebuilt from the recipe.

    ``shape`` is ``"narrow"`` (ViT width 24, MANIQA width 24, two images, every tensor in full)
    or ``"paper"`` (``main.py``'s module: ViT-B/8, width 768; the first image; the large tensors
    as summaries). Agreement means ``|agiqa − official| ≤ TOLERANCE · max(1, max|official|)``
    per tensor: 1e-5 absolute on tensors of magnitude ≤ 1 (scores, gates, patch weights),
    relative to the tensor's largest value otherwise (float32 on a CPU).
    """

    TOLERANCE = 1e-5

    def __init__(self, tmp: Path):
        self.meta = json.loads((MA_AGIQA_FIXTURE / "expected.json").read_text(encoding="utf-8"))
        self.arrays = dict(np.load(MA_AGIQA_FIXTURE / "expected.npz"))
        self.tmp = tmp
        self._narrow: dict[str, torch.Tensor] | None = None

    def model(self, shape: str = "narrow") -> dict[str, Any]:
        return self.meta["models"][shape]

    def state_dict(self, shape: str = "narrow") -> dict[str, torch.Tensor]:
        """The official module's state dict in its order; each tensor's bytes are checked against
        the digest of what the official module held."""
        if shape == "narrow" and self._narrow is not None:
            return self._narrow
        m = self.model(shape)
        sd = {}
        for name, dims, dtype in m["state_dict"]:
            if name in m["parameters"]:
                r = m["parameters"][name]
                u = np.random.RandomState(r["seed"]).random_sample(int(np.prod(dims)))
                u *= r["high"] - r["low"]
                u += r["low"]
                value, digest = u.astype(np.float32).reshape(dims), r["sha256"]
            else:  # Swin's buffers, saved from the narrow module (the same at both shapes)
                value, digest = self.arrays[f"narrow/buffers/{name}"], m["buffers"][name]
            assert list(value.shape) == dims and str(value.dtype) == dtype, name
            assert hashlib.sha256(value.tobytes()).hexdigest() == digest, f"{name}: not rebuilt"
            sd[name] = torch.from_numpy(value)
        if shape == "narrow":
            self._narrow = sd
        return sd

    def inputs(self, shape: str = "narrow") -> tuple[torch.Tensor, torch.Tensor]:
        """The official inputs: pixels [B, 3, 224, 224] float32 (agiqa's ``normalize`` of the
        uint8 images, checked to be the official transform's bytes) and semantics [B, 2, 4096]
        float16 (``tensor1``, ``tensor2``)."""
        from agiqa.data import normalize

        pixels = normalize(torch.from_numpy(self.arrays["inputs/images"]).permute(0, 3, 1, 2))
        assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == self.meta["pixels_sha256"]
        semantics = torch.cat([torch.from_numpy(self.arrays[f"inputs/tensor{i}"]) for i in (1, 2)],
                              dim=1)
        b = self.model(shape)["batch"]
        return pixels[:b], semantics[:b]

    def expected(self, shape: str, name: str) -> torch.Tensor:
        return torch.from_numpy(self.arrays[f"{shape}/{name}"])

    def tolerance(self, want: torch.Tensor) -> float:
        return self.TOLERANCE * max(1.0, want.abs().max().item())

    def check(self, got: torch.Tensor, shape: str, name: str) -> float:
        """Assert ``got`` is the official tensor ``name``; returns the largest difference."""
        if f"{shape}/{name}" in self.arrays:
            want = self.expected(shape, name)
            # agiqa's scores are [B] where the official module returns [B, 1].
            assert got.shape == want.shape or got.unsqueeze(-1).shape == want.shape, \
                f"{name}: agiqa {list(got.shape)}, official {list(want.shape)}"
            pairs = {"": (got, want)}
        else:  # a summary: a strided sample and the means over each non-batch axis
            stride = int(self.arrays[f"{shape}/{name}/stride"])
            x = got.reshape(got.shape[0], got.shape[1], -1).double()
            pairs = {"/sample": (got.reshape(-1)[::stride], self.expected(shape, f"{name}/sample")),
                     "/mean2": (x.mean(2).float(), self.expected(shape, f"{name}/mean2")),
                     "/mean1": (x.mean(1).float(), self.expected(shape, f"{name}/mean1"))}
        worst = 0.0
        for part, (value, want) in pairs.items():
            value = value.detach().reshape(want.shape).to(want.dtype)
            diff, tol = (value - want).abs().max().item(), self.tolerance(want)
            assert diff <= tol, f"{shape} {name}{part}: |agiqa - official| = {diff:.3g} > {tol:.3g}"
            worst = max(worst, diff)
        return worst

    def record(self, model: torch.nn.Module, pixels: torch.Tensor, semantics: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """agiqa's forward with hooks on the modules that match the official hooked ones: the
        tensors under the official names, the score (``"score"``) and the gates."""
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for hook in self.meta["hooks"]:
            official, kind = hook.split(":")
            module = model.get_submodule(AGIQA_MODULE.get(official, f"backbone.{official}"))
            if kind == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, hook=hook: seen.__setitem__(hook, args[0].detach().clone())))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _a, out, hook=hook: seen.__setitem__(hook, out.detach().clone())))
        try:
            with torch.no_grad():
                seen["score"], seen["gates"] = model(pixels, semantics, return_gates=True)
        finally:
            for h in handles:
                h.remove()
        return seen

    def checkpoint(self, semantic_dim: int = 4096) -> Path:
        """The narrow official state dict saved as ``main.py`` saves it (``torch.save``). A
        ``semantic_dim`` below 4096 keeps the first ``semantic_dim`` input columns of the layers
        that read semantic vectors (the official module at that width)."""
        path = self.tmp / f"MA_AGIQA_narrow_{semantic_dim}.pt"
        if not path.exists():
            sd = self.state_dict()
            if semantic_dim != 4096:
                sd = {k: v[:, :semantic_dim].contiguous()
                      if k.startswith("fc4096_") and k.endswith(".weight") else v
                      for k, v in sd.items()}
            torch.save(sd, path)
        return path


@pytest.fixture(scope="session")
def official_ma_agiqa(tmp_path_factory) -> OfficialMaAgiqa:
    """The official MA-AGIQA fixture (see :class:`OfficialMaAgiqa`)."""
    return OfficialMaAgiqa(tmp_path_factory.mktemp("official-ma-agiqa"))


@pytest.fixture(scope="session")
def ray_cluster():
    """Ray's multi-node test cluster, once per test process: a head without CPUs (the driver's)
    and two nodes of one CPU each; a dead node is noticed within about a second. The tests of
    ``--engine ray`` and the pages that run it share it (``xdist_group("demo-and-ray")``)."""
    ray = pytest.importorskip("ray", reason="Ray is installed by the test extra")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()
