"""Every side-by-side comparison of agiqa and the official code on one GPU, in one run.

    python benchmarks/gpu_suite.py --out gpu-results          # one H100: under 8 minutes
    python benchmarks/gpu_suite.py --out gpu-results --parts stage_one --budget 540 \
        --models mplug-owl2-7b,llava-1.5-7b                   # stage one, two models
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke   # tiny shapes, CPU, < 2 minutes

Writes ``DIR/gpu_suite.json`` (after every part, so a run cut short keeps what it measured)
and ``DIR/gpu_suite.md`` (one table). The parts, each on the same device and the same images:

* stage one on random models of the full 7B shapes (LLaVA-1.5-7B, Qwen2.5-VL-7B, and
  mPLUG-Owl2-7B where its model family is available), their weights created on the GPU
  directly in the presets' dtype (bf16; mPLUG-Owl2 float16): the official loop
  (``official_stage_one.official_loop``: two forward passes per image and prompt, batch 8,
  timed on a subset: it has no pipeline to fill) against agiqa's ``extract_semantics``, every
  agiqa run over ``--stage-one-images`` (2,000) images. The first agiqa row runs at the CLI's
  defaults (batch 8, prompts fused, loader processes by the CPU count, no compilation); the
  others are labelled with the option that differs (a larger batch, the other fusing,
  ``--compile``), and the forward passes alone show what the pipeline costs. Fractions of the
  dense bf16 peak count useful FLOPs only, the same for both sides: the language model once per
  image and prompt, the vision tower once per image;
* stage two: ``agiqa fit`` against the official training loop (``official_stage_two.py``)
  with the paper's ViT-B/8 (random init), float32 at batch 8 on both sides, then agiqa with
  bf16 autocast at a larger batch, and the same with ``--compile``: training images/s and
  seconds per AGIQA-3K-sized epoch (whole processes);
* cache reads at AIGCIQA-20K size (14,000 × 2 × 4096) against one ``torch.load`` per vector.

Every part has a wall-clock budget; stage one sizes its image count from a timed warm-up so
that the official loop fits its share. The cache format is HDF5 where zarr is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if (SRC / "agiqa").is_dir():  # run the checkout's agiqa, also in the processes started here
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cache_read  # noqa: E402
import stage_two  # noqa: E402
from common import load_average, machine  # noqa: E402
from official_stage_one import list_photos, official_loop  # noqa: E402
from stage_one import count_flops_split, peak_bf16_tflops, write_photos  # noqa: E402

# Stage-one models: the SHAPES of agiqa.models.mllm.tiny, and tiny ones for --smoke.
STAGE_ONE = ("llava-1.5-7b", "qwen2.5-vl-7b", "mplug-owl2-7b")
SMOKE_SHAPES = {
    "llava-1.5-7b": {"family": "llava", "hidden": 64, "layers": 2, "image_size": 32},
    "qwen2.5-vl-7b": {"family": "qwen2.5-vl", "hidden": 64, "layers": 2, "image_size": 56},
    "mplug-owl2-7b": {"family": "mplug-owl2", "hidden": 64, "layers": 2, "image_size": 56},
}
# The presets' dtype per model (mPLUG-Owl2's official code runs in float16).
DTYPES = {"llava-1.5-7b": "bfloat16", "qwen2.5-vl-7b": "bfloat16", "mplug-owl2-7b": "float16"}
# The larger batch per model: mPLUG-Owl2's rows are short (65 visual tokens), so it takes more.
LARGE_BATCH = {"llava-1.5-7b": 16, "qwen2.5-vl-7b": 16, "mplug-owl2-7b": 32}


class Budget:
    """Wall-clock seconds for the whole suite, handed out to its parts."""

    def __init__(self, total: float):
        self.start, self.total = time.perf_counter(), total

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """A bf16 n×n×n matrix product's rate on random data, measured here (the real ceiling)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return round(2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def _timed(device: torch.device, fn) -> tuple[float, Any]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _agiqa_extract(encoder, photos: Path, keys: list[str], out: Path, batch: int,
                   workers: int | None, fmt: str, fuse: bool | None):
    """``extract_semantics`` as the CLI runs it; ``workers=None`` and ``fuse=None`` are the
    CLI's defaults (loader processes from the CPUs and the device; the family's fusing)."""
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

    if out.exists():
        shutil.rmtree(out)
    encoder.set_fuse_prompts(fuse)
    cfg = ExtractConfig(out=out, batch_size=batch, loader_workers=workers, format=fmt,
                        progress=False, device=str(encoder.device),
                        dtype=str(encoder.dtype).removeprefix("torch."))
    return extract_semantics(cfg, ImageSource(photos, keys), encoder)


def _build(spec: dict, dtype: str, model_dir: Path, device: torch.device, row: dict):
    """A random model of ``spec`` made on ``device``, and agiqa's encoder attached to it."""
    from agiqa.models.mllm import SemanticEncoder
    from agiqa.models.mllm.tiny import random_mllm_on_device
    from agiqa.presets import load_prompts

    _reset_peak(device)
    seconds, model = _timed(device, lambda: random_mllm_on_device(
        spec, model_dir, device, getattr(torch, dtype)))
    row["build_seconds"] = round(seconds, 1)
    row["parameters_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    row["attention"] = getattr(model.config, "_attn_implementation", None)
    # agiqa's encoder renders the prompts; the official loop gets the same texts.
    encoder = SemanticEncoder(str(model_dir), load_prompts("paper"), device=str(device),
                              dtype=dtype).attach(model)
    return model, encoder


def stage_one(name: str, spec: dict, dtype: str, work: Path, photos: Path, device: torch.device,
              seconds: float, images: int, big_batch: int, workers: int | None,
              compile_row: bool, time_boxed: bool = True) -> dict:
    """One model: the official loop, then agiqa at the CLI's defaults and at labelled other
    settings, on the same images.

    FLOPs are the useful work of an image, the same figure for both sides: the language model
    once per prompt and the vision tower once per image (its output does not depend on the
    prompt). The official loop's redundant passes (two per prompt, each with its own vision
    pass) earn it nothing, nor do agiqa's padding tokens.
    """
    from agiqa.models.mllm.tiny import shape_available
    from agiqa.stages.extraction.extract import default_loader_workers

    if not shape_available(spec):
        return {"skipped": f"the {spec['family']} model family is not in this agiqa"}
    deadline = time.perf_counter() + seconds
    row: dict[str, Any] = {"dtype": dtype}
    model, encoder = _build(spec, dtype, work / f"mllm-{name}", device, row)
    processor = encoder.processor
    prefix = encoder.prompts.answer_prefix
    texts = [e.text + ("" if e.text[-1:].isspace() else " ") + prefix
             for e in encoder.encodings]
    paths = list_photos(photos)[:images]
    fmt = cache_read.available_formats()[0]
    # Warm up (kernels, cuBLAS handles), then time one more batch to size the official run:
    # it has no pipeline to fill, so its rate holds on a subset (a quarter of this model's
    # seconds); every agiqa run covers all ``images``.
    official_loop(model, processor, paths[:8], work / "warm-official", 8, texts)
    t_batch, _ = _timed(device, lambda: official_loop(model, processor, paths[8:16],
                                                      work / "warm-official", 8, texts))
    n_off = int(0.25 * seconds / max(t_batch, 1e-3) * 8) // 8 * 8
    n_off = max(8, min(len(paths), n_off))
    row["images"] = len(paths)
    t_off, forwards = _timed(device, lambda: official_loop(
        model, processor, paths[:n_off], work / f"official-{name}", 8, texts))
    row["official"] = {"batch_size": 8, "images": n_off,
                       "images_per_second": round(n_off / t_off, 3),
                       "forward_passes_per_image": forwards / n_off,
                       "seconds": round(t_off, 2), "peak_gib": _peak_gib(device)}
    keys = [p.name for p in paths]
    # mPLUG-Owl2: a token runs through one of the two multiway key/value projections.
    unused = 2 * spec["layers"] * spec["hidden"] ** 2 if spec["family"] == "mplug-owl2" else 0
    language, vision = count_flops_split(model, processor, paths[:16], unused,
                                         encoder.encodings[0])
    useful = language * len(encoder.encodings) + vision
    row["flops_per_image_prompt"] = float(f"{language + vision:.4g}")
    row["vision_flops_per_image"] = float(f"{vision:.4g}")
    row["useful_flops_per_image"] = float(f"{useful:.4g}")
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" \
        else None
    off_ips = row["official"]["images_per_second"]
    _credit(row["official"], useful, peak)
    row["official"]["executed_tflops"] = round(
        (language + vision) * forwards / t_off / 1e12, 1)
    fused = encoder.fuse_prompts  # the family's default
    # (label, batch, fuse, compile, what differs from the CLI's defaults); defaults first.
    runs = [("agiqa", 8, None, False, "CLI defaults"),
            (f"agiqa_batch_{big_batch}", big_batch, None, False, f"--batch-size {big_batch}"),
            (f"agiqa_batch_{big_batch}_" + ("separate" if fused else "fused"), big_batch,
             not fused, False, f"--batch-size {big_batch} "
             + ("--no-fuse-prompts" if fused else "--fuse-prompts"))]
    if compile_row:
        runs.append(("agiqa_compile", 8, None, True, "--compile"))
    row["default_loader_workers"] = default_loader_workers(device) if workers is None \
        else workers
    done: list[str] = []
    for label, batch, fuse, compiled, setting in runs:
        # The CLI-default run always; the others while this model's time lasts (each is
        # estimated from the default run, compilation at 90 s).
        if done and time_boxed and time.perf_counter() + row["agiqa"]["seconds"] * 1.3 + \
                (90 if compiled else 0) > deadline:
            row[label] = {"skipped": "out of this model's time", "setting": setting}
            continue
        if compiled:
            from agiqa.models.mllm import compile_blocks

            compile_blocks(model)
        r = agiqa_run(encoder, photos, keys, work / f"agiqa-{name}", batch, fuse,
                      workers, fmt, device, useful, peak, off_ips)
        r["setting"] = setting
        r["compile"] = compiled
        row[label] = r
        done.append(label)
    row["runs"] = done
    only = model_only(encoder, paths[:big_batch], device, useful, peak)
    only["speedup"] = round(only["images_per_second"] / off_ips, 2)
    only["setting"] = f"forward passes alone, batch {big_batch}, inputs prepared"
    row["model_only"] = only
    return row


def _credit(r: dict, useful: float, peak: float | None) -> None:
    """Useful TFLOP/s and the fraction of the dense bf16 peak from ``r``'s images/s."""
    tflops = useful * r["images_per_second"] / 1e12
    r["useful_tflops"] = round(tflops, 2)
    if peak:
        r["fraction_of_bf16_peak"] = round(tflops / peak, 3)


def agiqa_run(encoder, photos: Path, keys: list[str], out: Path, batch: int, fuse: bool | None,
              workers: int | None, fmt: str, device: torch.device, useful: float,
              peak: float | None, official_ips: float) -> dict:
    """One timed ``extract_semantics`` over ``keys`` (after a warm-up run of a few batches),
    credited with the useful FLOPs of its images."""
    _agiqa_extract(encoder, photos, keys[: max(4 * batch, 16)], out.with_name("warm-agiqa"),
                   batch, workers, fmt, fuse)
    _reset_peak(device)
    sec, report = _timed(device, lambda: _agiqa_extract(encoder, photos, keys, out, batch,
                                                        workers, fmt, fuse))
    # Throughput counts every image run through the model: random weights in float16
    # may overflow, which agiqa records as a failure after the forward passes.
    r = {"batch_size": batch, "fused_prompts": encoder.fuse_prompts,
         "loader_workers": report.loader_workers, "images": len(keys),
         "images_per_second": round(len(keys) / sec, 3),
         "forward_passes_per_image": report.forward_passes / len(keys),
         "model_calls": report.model_calls,
         "seconds": round(sec, 2), "padding_fraction": report.to_dict()["padding_fraction"],
         "failed": len(report.failures), "peak_gib": _peak_gib(device),
         "speedup": round(len(keys) / sec / official_ips, 2)}
    _credit(r, useful, peak)
    return r


def model_only(encoder, paths: list[Path], device: torch.device, useful: float,
               peak: float | None, reps: int = 3) -> dict:
    """The forward passes alone on one prepared batch (family default fusing), timed ``reps``
    times after a warm-up: what the model does when loading, decoding and writing cost nothing.
    The gap to the whole-run rate is the pipeline's."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    encoder.set_fuse_prompts(None)
    batches = encoder.prepare.all_prompts(images)
    encoder.encode_all(batches)
    sec, _ = _timed(device, lambda: [encoder.encode_all(batches) for _ in range(reps)])
    n = len(images) * reps
    rows = sum(b["input_ids"].shape[0] for b in batches) * reps
    out = {"batch_size": len(images), "fused_prompts": encoder.fuse_prompts,
           "images_per_second": round(n / sec, 3), "forward_passes_per_image": rows / n}
    _credit(out, useful, peak)
    return out


GENERATED_SIZES = ((512, 512), (1024, 1024), (768, 768), (1024, 768), (768, 1024))


def write_generated_sizes(folder: Path, n: int) -> None:
    """n real photographs at the sizes text-to-image models generate (512 to 1024 px, as in
    AGIQA-3K and AIGCIQA-20K): the token count of dynamic-resolution models follows them."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from agiqa.pipeline.demo import demo_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(demo_photos().values())

    def one(i: int) -> None:
        w, h = GENERATED_SIZES[i % len(GENERATED_SIZES)]
        img = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.BICUBIC)
        img.save(folder / f"img{i:05d}.jpg", quality=92)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def run_stage_one(args, work: Path, device: torch.device, budget: Budget, result: dict,
                  save) -> None:
    from agiqa.models.mllm.tiny import SHAPES

    photos = work / "photos"
    if args.smoke:
        write_photos(photos, args.stage_one_images)
    else:
        write_generated_sizes(photos, args.stage_one_images)
    models = args.models.split(",") if args.models else list(STAGE_ONE)
    unknown = set(models) - set(STAGE_ONE)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)} (choose from {STAGE_ONE})")
    shares = len(models)
    for i, name in enumerate(models):
        spec = SMOKE_SHAPES[name] if args.smoke else SHAPES[name]
        dtype = "float32" if args.smoke else DTYPES[name]
        # This model's share of what is left for stage one, less what the later parts need.
        seconds = (budget.left() - args.reserve) / (shares - i)
        if seconds < args.min_part and not args.smoke:
            result["stage_one"][name] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
            continue
        t = time.perf_counter()
        try:
            row = stage_one(name, spec, dtype, work, photos, device, 0.8 * seconds,
                            args.stage_one_images, 16 if args.smoke else LARGE_BATCH[name],
                            None, compile_row=not args.smoke and not args.no_compile,
                            time_boxed=not args.smoke)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the rest
            row = {"failed": f"{type(e).__name__}: {str(e)[:400]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model is gone with stage_one's frame
        row["part_seconds"] = round(time.perf_counter() - t, 1)
        result["stage_one"][name] = row
        save()


def run_stage_two(args, work: Path, budget: Budget, result: dict) -> None:
    seconds = budget.left() - args.cache_seconds
    if seconds < 2 * args.min_part and not args.smoke:
        result["stage_two"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
        return
    backbone = "tiny" if args.smoke else "vit_base_patch8_224"
    big = 8 if args.smoke else 64  # ViT-B/8 at 224 px, bf16: 64 fit in well under 40 GiB
    # Smoke runs keep one agiqa process (its start-up dominates at tiny shapes).
    runs: list[tuple[str, int, bool | None, bool]] = [] if args.smoke else [
        ("agiqa_float32", 8, False, False)]
    runs.append(("agiqa_fast", big, not args.smoke, False))
    if not args.smoke:
        runs.append(("agiqa_fast_compile", big, True, True))
    t = time.perf_counter()
    try:
        result["stage_two"] = stage_two.measure(
            work / "stage-two", backbone, args.stage_two_images, 1 if args.smoke else 2,
            args.dim,
            args.loader_workers, runs, timeout=args.process_timeout or 0.35 * seconds,
            deadline=None if args.smoke else time.perf_counter() + seconds)
    except RuntimeError as e:
        result["stage_two"] = {"failed": str(e)[:500]}
    result["stage_two"]["part_seconds"] = round(time.perf_counter() - t, 1)
    # The paper's protocol (float32, batch 8) for N runs trained together, against the official
    # loop's training images/s above; "10 repeats of AGIQA-3K" from the measured epochs.
    n = 2 if args.smoke else args.stage_two_repeats
    left = budget.left() - args.cache_seconds
    if not args.smoke and left < 60:
        result["stage_two_series"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
        return
    t = time.perf_counter()
    try:
        series = stage_two.measure_series(
            work / "stage-two", backbone, args.stage_two_images, 1 if args.smoke else 2,
            # on the GPU agiqa's own choice; the CPU smoke asks for all n (a CPU's default is 1)
            args.dim, args.loader_workers, n, n if args.smoke else None, solo=False,
            timeout=args.process_timeout or max(left - 5, 30))
        official = result["stage_two"].get("official", {})
        if official.get("train_images_per_second"):
            series["speedup_train_images_per_second_vs_official"] = round(
                series["together"]["train_images_per_second"]
                / official["train_images_per_second"], 2)
            # 10 runs × 30 epochs of AGIQA-3K (2087 trained, 298 + 597 scored per run)
            scale = stage_two.AGIQA_3K_IMAGES / args.stage_two_images
            k = series["together"]["concurrent_runs"]
            series["ten_repeats_agiqa_3k_hours"] = {
                "official": round(10 * 30 * official["epoch_seconds"] * scale / 3600, 2),
                "agiqa": round(math.ceil(10 / k) * 30 * series["together"]["epoch_seconds"]
                               * scale / 3600, 2)}
        result["stage_two_series"] = series
    except RuntimeError as e:
        result["stage_two_series"] = {"failed": str(e)[:500]}
    result["stage_two_series"]["part_seconds"] = round(time.perf_counter() - t, 1)


def run_cache_reads(args, work: Path, result: dict) -> None:
    t = time.perf_counter()
    try:
        result["cache_reads"] = cache_read.measure(
            work / "cache-reads", args.cache_images, 2, args.dim, 1024, warm=1,
            repeats=1 if args.smoke else 2)
    except Exception as e:  # noqa: BLE001
        result["cache_reads"] = {"failed": f"{type(e).__name__}: {str(e)[:400]}"}
    result["cache_reads"]["part_seconds"] = round(time.perf_counter() - t, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Folder for gpu_suite.json and gpu_suite.md.")
    ap.add_argument("--smoke", action="store_true",
                    help="Tiny shapes on the CPU: the same code paths, in under two minutes.")
    ap.add_argument("--budget", type=float, default=None,
                    help="Wall-clock seconds for the whole suite (default 400; smoke 100).")
    ap.add_argument("--parts", default="stage_one,stage_two,cache_reads")
    ap.add_argument("--stage-two-repeats", type=int, default=10,
                    help="Runs of the paper's protocol trained together in stage two.")
    ap.add_argument("--stage-one-images", type=int, default=2000,
                    help="Images of every timed agiqa stage-one run (default 2000).")
    ap.add_argument("--models", default=None,
                    help="Stage-one models, comma-separated (default: all of "
                         f"{', '.join(STAGE_ONE)}).")
    ap.add_argument("--no-compile", action="store_true",
                    help="Leave out stage one's --compile rows.")
    args = ap.parse_args(argv)
    args.budget = args.budget or (100.0 if args.smoke else 400.0)
    args.min_part = 3.0 if args.smoke else 20.0
    # Smoke runs exercise the code paths: no process is cut short by the budget there.
    args.process_timeout = 300.0 if args.smoke else None
    args.loader_workers = 1 if args.smoke else min(8, max(1, (os.cpu_count() or 2) // 2))
    # Every timed agiqa run of stage one covers this many images (fill and fixed costs then
    # take their true share); smoke runs stay tiny.
    args.stage_one_images = 16 if args.smoke else args.stage_one_images
    args.stage_two_images = 48 if args.smoke else 400  # validation and test need 4+ images
    args.cache_images = 200 if args.smoke else 14000
    args.dim = 64 if args.smoke else 4096
    args.cache_seconds = 10.0 if args.smoke else 45.0
    parts = set(args.parts.split(","))
    args.reserve = (args.cache_seconds if "cache_reads" in parts else 0.0) + (
        (35.0 if args.smoke else 150.0) if "stage_two" in parts else 0.0)
    budget = Budget(args.budget)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "suite": "gpu_suite", "smoke": args.smoke, "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_seconds": args.budget,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "versions": versions(), "stage_one": {}}
    if device.type == "cuda":
        result["bf16_peak_tflops"] = peak_bf16_tflops(result["device"])
        result["measured_bf16_matmul_tflops"] = matmul_tflops(device)

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - budget.start, 1)
        result["load_average"] = load_average()
        tmp = out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out / "gpu_suite.json")
        tmp = out / "gpu_suite.md.tmp"
        tmp.write_text(markdown(result))
        os.replace(tmp, out / "gpu_suite.md")

    with tempfile.TemporaryDirectory(prefix="agiqa-suite-") as tmp:
        work = Path(tmp)
        if "stage_one" in parts:
            run_stage_one(args, work, device, budget, result, save)
        if "stage_two" in parts:
            run_stage_two(args, work, budget, result)
            save()
        if "cache_reads" in parts:
            run_cache_reads(args, work, result)
    save()
    sys.stdout.write(markdown(result))
    return 0


def versions() -> dict[str, str | None]:
    """The software the figures depend on: GPU driver, CUDA, torch, transformers, timm."""
    import importlib.metadata as md
    import subprocess

    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "timm", "pillow", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 \
            and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


def _cell(row: dict, key: str, unit: str = "") -> str:
    v = row.get(key)
    return "–" if v is None else f"{v}{unit}"


def markdown(r: dict) -> str:
    """The suite's results as one Markdown table (plus a header line)."""
    lines = [f"GPU suite on {r['device']} ({'smoke, ' if r['smoke'] else ''}"
             f"{r.get('seconds', 0)} s; dense bf16 peak {r.get('bf16_peak_tflops', '–')} "
             f"TFLOP/s, measured bf16 matmul {r.get('measured_bf16_matmul_tflops', '–')} "
             "TFLOP/s)", "",
             "| part | run | images/s (or reads) | vs official | details |",
             "|---|---|---|---|---|"]
    for name, row in r.get("stage_one", {}).items():
        if "official" not in row:
            lines.append(f"| stage one {name} | – | – | – | "
                         f"{row.get('skipped') or row.get('failed')} |")
            continue
        for run in ("official", *row.get("runs", ()), "model_only"):
            if run not in row:
                continue
            x = row[run]
            if run == "official":
                how = f"official loop, batch 8, {x['images']} images"
            else:
                how = f"{run}: {x.get('setting')}"
                if "images" in x:
                    how += f", batch {x['batch_size']}, loader processes: {x['loader_workers']}"
            lines.append(
                f"| stage one {name} ({row['dtype']}, {row['images']} images) | {how} | "
                f"{_cell(x, 'images_per_second')} | "
                f"{_cell(x, 'speedup', '×') if run != 'official' else '1×'} | "
                f"{x.get('forward_passes_per_image')} forwards/image; useful "
                f"{row['useful_flops_per_image'] / 1e12:.3g} TFLOP/image, "
                f"{_cell(x, 'useful_tflops')} TFLOP/s = "
                f"{_cell(x, 'fraction_of_bf16_peak')} of peak; peak memory "
                f"{_cell(x, 'peak_gib', ' GiB')} |")
    s2 = r.get("stage_two")
    if s2 and "official" in s2:
        for run in ("official", "agiqa_float32", "agiqa_fast", "agiqa_fast_compile"):
            x = s2.get(run)
            if x is None:
                continue
            if "failed" in x:
                lines.append(f"| stage two | {run} | – | – | {x['failed'][:120]} |")
                continue
            lines.append(
                f"| stage two {s2['backbone']} ({s2['images']} images) | {run}, batch "
                f"{x['batch_size']}, {x['precision']}{', compiled' if x.get('compile') else ''}"
                f" | {x['train_images_per_second']} | "
                f"{_cell(x, 'speedup_train_images_per_second', '×') if run != 'official' else '1×'}"
                f" | {x['agiqa_3k_epoch_seconds']} s per AGIQA-3K epoch, process "
                f"{x['process_seconds']} s |")
    elif s2:
        lines.append(f"| stage two | – | – | – | {s2.get('skipped') or s2.get('failed')} |")
    ss = r.get("stage_two_series")
    if ss and "together" in ss:
        x = ss["together"]
        ten = ss.get("ten_repeats_agiqa_3k_hours", {})
        lines.append(
            f"| stage two {ss['backbone']}, {ss['repeats']} runs together | float32, batch 8, "
            f"{x['concurrent_runs']} at once | {x['train_images_per_second']} "
            f"({x['per_run_train_images_per_second']} per run) | "
            f"{_cell(ss, 'speedup_train_images_per_second_vs_official', '×')} | 10 repeats of "
            f"AGIQA-3K: {ten.get('agiqa', '–')} h against {ten.get('official', '–')} h |")
    elif ss:
        lines.append(f"| stage two series | – | – | – | {ss.get('skipped') or ss.get('failed')} |")
    c = r.get("cache_reads")
    if c and "official_torch_load" in c:
        base = c["official_torch_load"]
        lines.append(f"| cache reads {c['images']} × {c['prompts']} × {c['dim']} | one torch.load "
                     f"per vector | cold {base['cold_seconds']} s, warm {base['warm_seconds']} s"
                     " | 1× | |")
        for fmt in ("zarr", "hdf5"):
            x = c.get(f"agiqa_{fmt}")
            if x:
                lines.append(f"| cache reads | agiqa {fmt} | cold {x['cold_seconds']} s, warm "
                             f"{x['warm_seconds']} s | {x['speedup_cold']}× cold, "
                             f"{x['speedup_warm']}× warm | |")
    elif c:
        lines.append(f"| cache reads | – | – | – | {c.get('failed')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
