"""Every side-by-side comparison of agiqa and the official code on one GPU, in one run.

    python benchmarks/gpu_suite.py --out gpu-results          # one H100: under 8 minutes
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke   # tiny shapes, CPU, < 2 minutes

Writes ``DIR/gpu_suite.json`` (after every part, so a run cut short keeps what it measured)
and ``DIR/gpu_suite.md`` (one table). The parts, each on the same device and the same images:

* stage one on random models of the full 7B shapes (LLaVA-1.5-7B, Qwen2.5-VL-7B, and
  mPLUG-Owl2-7B where its model family is available), their weights created on the GPU
  directly in the presets' dtype (bf16; mPLUG-Owl2 float16): the official loop
  (``official_stage_one.official_loop``: two forward passes per image and prompt, batch 8)
  against agiqa's ``extract_semantics`` at batch 8 and at a larger batch. Both run in this
  process on the same model object after a warm-up batch; reported: images/s, forward passes
  per image, peak GPU memory, FLOPs per image and the achieved fraction of the device's dense
  bf16 peak (and of a bf16 matrix product measured here);
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

# Stage-one models: the SHAPES of agiqa.testing.tiny_mllm, and tiny ones for --smoke.
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
                   workers: int, fmt: str, fuse: bool):
    from agiqa.stages.semantics import ExtractConfig, ImageSource, extract_semantics

    if out.exists():
        shutil.rmtree(out)
    encoder.set_fuse_prompts(fuse)
    cfg = ExtractConfig(out=out, batch_size=batch, loader_workers=workers, format=fmt,
                        progress=False, device=str(encoder.device), dtype=encoder.dtype)
    return extract_semantics(cfg, ImageSource(photos, keys), encoder)


def _build(spec: dict, dtype: str, model_dir: Path, device: torch.device, row: dict):
    """A random model of ``spec`` made on ``device``, and agiqa's encoder attached to it."""
    from agiqa.models.mllm import SemanticEncoder
    from agiqa.presets import load_prompts
    from agiqa.testing.tiny_mllm import random_mllm_on_device

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
              seconds: float, max_images: int, big_batch: int, workers: int) -> dict:
    """One model: the official loop, then agiqa at batch 8 and ``big_batch``, same images."""
    from agiqa.testing.tiny_mllm import shape_available

    if not shape_available(spec):
        return {"skipped": f"the {spec['family']} model family is not in this agiqa"}
    row: dict[str, Any] = {"dtype": dtype}
    model, encoder = _build(spec, dtype, work / f"mllm-{name}", device, row)
    processor = encoder.processor
    prefix = encoder.prompts.answer_prefix
    texts = [e.text + ("" if e.text[-1:].isspace() else " ") + prefix
             for e in encoder.encodings]
    paths = list_photos(photos)
    fmt = cache_read.available_formats()[0]
    # Warm up (kernels, cuBLAS handles), then time one more batch to size the run: the
    # official loop gets 35 % of this model's seconds, agiqa's three runs share the rest.
    official_loop(model, processor, paths[:8], work / "warm-official", 8, texts)
    t_batch, _ = _timed(device, lambda: official_loop(model, processor, paths[8:16],
                                                      work / "warm-official", 8, texts))
    n = int(0.35 * seconds / max(t_batch, 1e-3) * 8) // 8 * 8
    n = max(8, min(max_images, n))
    row["images"] = n
    t_off, forwards = _timed(device, lambda: official_loop(
        model, processor, paths[:n], work / f"official-{name}", 8, texts))
    row["official"] = {"batch_size": 8, "images_per_second": round(n / t_off, 3),
                       "forward_passes_per_image": forwards / n, "seconds": round(t_off, 2),
                       "peak_gib": _peak_gib(device)}
    keys = [p.name for p in paths[:n]]
    # mPLUG-Owl2: a token runs through one of the two multiway key/value projections.
    unused = 2 * spec["layers"] * spec["hidden"] ** 2 if spec["family"] == "mplug-owl2" else 0
    language, vision = count_flops_split(model, processor, paths[: min(n, 16)], unused,
                                         encoder.encodings[0])
    flops = language + vision
    row["flops_per_image_prompt"] = float(f"{flops:.4g}")
    row["vision_flops_per_image"] = float(f"{vision:.4g}")
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" \
        else None
    default_fuse = encoder.fuse_prompts
    runs = (("agiqa", 8, default_fuse), ("agiqa_large_batch", big_batch, default_fuse),
            ("agiqa_large_batch_" + ("separate" if default_fuse else "fused"), big_batch,
             not default_fuse))
    for label, batch, fuse in runs:
        row[label] = agiqa_run(encoder, photos, keys, work / f"agiqa-{name}", batch, fuse,
                               workers, fmt, device, (language, vision), peak,
                               row["official"]["images_per_second"])
    only = model_only(encoder, paths[:big_batch], device, language, vision, peak)
    only["speedup"] = round(only["images_per_second"] / row["official"]["images_per_second"], 2)
    row["model_only"] = only
    off_tflops = flops * forwards / t_off / 1e12
    row["official"]["achieved_tflops"] = round(off_tflops, 1)
    if peak:
        row["official"]["fraction_of_bf16_peak"] = round(off_tflops / peak, 3)
    return row


def agiqa_run(encoder, photos: Path, keys: list[str], out: Path, batch: int, fuse: bool,
              workers: int, fmt: str, device: torch.device, flops: tuple[float, float],
              peak: float | None, official_ips: float) -> dict:
    """One timed ``extract_semantics`` over ``keys`` (after a warm-up run of one batch)."""
    language, vision = flops
    _agiqa_extract(encoder, photos, keys[: max(batch, 8)], out.with_name("warm-agiqa"), batch,
                   workers, fmt, fuse)
    _reset_peak(device)
    sec, report = _timed(device, lambda: _agiqa_extract(encoder, photos, keys, out, batch,
                                                        workers, fmt, fuse))
    # Throughput counts every image run through the model: random weights in float16
    # may overflow, which agiqa records as a failure after the forward passes.
    r = {"batch_size": batch, "fused_prompts": fuse,
         "images_per_second": round(len(keys) / sec, 3),
         "forward_passes_per_image": report.forward_passes / len(keys),
         "model_calls": report.model_calls,
         "seconds": round(sec, 2), "padding_fraction": report.to_dict()["padding_fraction"],
         "failed": len(report.failures), "peak_gib": _peak_gib(device),
         "speedup": round(len(keys) / sec / official_ips, 2)}
    # FLOPs done: a vision pass per image and prompt, or one per image when shared.
    vision_passes = report.forward_passes / len(encoder.encodings) \
        if encoder.prepare.share_images else report.forward_passes
    tflops = (language * report.forward_passes + vision * vision_passes) / sec / 1e12
    r["achieved_tflops"] = round(tflops, 1)
    if peak:
        r["fraction_of_bf16_peak"] = round(tflops / peak, 3)
    return r


def model_only(encoder, paths: list[Path], device: torch.device, language: float,
               vision: float, peak: float | None, reps: int = 3) -> dict:
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
    vision_passes = rows / len(encoder.encodings) if encoder.prepare.share_images else rows
    tflops = (language * rows + vision * vision_passes) / sec / 1e12
    out = {"batch_size": len(images), "fused_prompts": encoder.fuse_prompts,
           "images_per_second": round(n / sec, 3), "forward_passes_per_image": rows / n,
           "achieved_tflops": round(tflops, 1)}
    if peak:
        out["fraction_of_bf16_peak"] = round(tflops / peak, 3)
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
    from agiqa.testing.tiny_mllm import SHAPES

    photos = work / "photos"
    if args.smoke:
        write_photos(photos, args.stage_one_images)
    else:
        write_generated_sizes(photos, args.stage_one_images)
    shares = len(STAGE_ONE)
    for i, name in enumerate(STAGE_ONE):
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
                            args.loader_workers)
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
    args = ap.parse_args(argv)
    args.budget = args.budget or (100.0 if args.smoke else 400.0)
    args.min_part = 3.0 if args.smoke else 20.0
    # Smoke runs exercise the code paths: no process is cut short by the budget there.
    args.process_timeout = 300.0 if args.smoke else None
    args.loader_workers = 1 if args.smoke else min(8, max(1, (os.cpu_count() or 2) // 2))
    args.stage_one_images = 16 if args.smoke else 384
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
        "stage_one": {}}
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
        for run in ("official", "agiqa", "agiqa_large_batch", "agiqa_large_batch_fused",
                    "agiqa_large_batch_separate", "model_only"):
            if run not in row:
                continue
            x = row[run]
            how = {True: ", prompts fused", False: ", a pass per prompt"}.get(
                x.get("fused_prompts"), "")
            lines.append(
                f"| stage one {name} ({row['dtype']}, {row['images']} images) | {run} batch "
                f"{x.get('batch_size')}{how} | {_cell(x, 'images_per_second')} | "
                f"{_cell(x, 'speedup', '×') if run != 'official' else '1×'} | "
                f"{x.get('forward_passes_per_image')} forwards/image of "
                f"{row['flops_per_image_prompt'] / 1e12:.3g} TFLOP, "
                f"{_cell(x, 'achieved_tflops')} TFLOP/s = "
                f"{_cell(x, 'fraction_of_bf16_peak')} of peak, peak memory "
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
