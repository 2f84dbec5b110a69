"""Stage one: ``agiqa extract-semantics`` against the official loop, as whole processes.

Same model, same real photographs, both started from the shell. Reports images/s, forward
passes per image, peak memory and the speed-up; on a GPU also the achieved fraction of the
bf16 peak.

    python benchmarks/stage_one.py                        # CPU: a forward-dominated small LLaVA
    python benchmarks/stage_one.py --shape llava-1.5-7b   # GPU: 7B-shaped, random bf16 weights
    python benchmarks/stage_one.py --shape qwen2.5-vl-7b  # GPU: dynamic resolution, 7B-shaped
    python benchmarks/stage_one.py --shape cpu-mplug-owl2 [--fuse-prompts off]  # CPU, mPLUG-Owl2

agiqa runs at the CLI's defaults (loader processes included) unless an option is given;
``--baseline-src DIR`` adds a third row, the agiqa of another source tree at its defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_process, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent

# Widths of the language model / vision tower. "cpu" is small enough for a laptop but large
# enough that the forward passes, not Python, dominate.
SHAPES = {
    "cpu": {"family": "llava", "hidden": 768, "layers": 8, "image_size": 96},
    "cpu-qwen": {"family": "qwen2-vl", "hidden": 768, "layers": 8, "image_size": 224},
    # mPLUG-Owl2's proportions: the vision tower and abstractor cost about half a language pass.
    "cpu-mplug-owl2": {"family": "mplug-owl2", "hidden": 768, "layers": 8, "image_size": 224,
                       "patch": 14,
                       "vision": {"hidden_size": 384, "intermediate_size": 1536,
                                  "num_hidden_layers": 6, "num_attention_heads": 6},
                       "abstractor": {"hidden_size": 384, "num_hidden_layers": 2,
                                      "num_attention_heads": 6, "intermediate_size": 1024},
                       "text": {"intermediate_size": 2048, "num_attention_heads": 12,
                                "num_key_value_heads": 12}},
    "llava-1.5-7b": {"family": "llava", "random": "llava-1.5-7b"},
    "qwen2.5-vl-7b": {"family": "qwen2.5-vl", "random": "qwen2.5-vl-7b"},
}
# Dense bf16 peaks by the vendors' datasheets; the first name contained in the device's wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0}


def write_photos(folder: Path, n: int) -> None:
    from agiqa.pipeline.demo import demo_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(demo_photos().values())
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        scale = 0.5 + 0.5 * ((i * 7) % 10) / 10  # various sizes, as generations are
        img = Image.fromarray(a).resize((max(64, int(w * scale)), max(64, int(h * scale))))
        img.save(folder / f"img{i:05d}.jpg", quality=92)


def build_model(shape: str, out: Path) -> Path:
    spec = SHAPES[shape]
    from agiqa.models.mllm.tiny import build_random_mllm, build_tiny_mllm, random_mllm_on_device

    if spec["family"] == "mplug-owl2":  # agiqa's own family: built in memory, then saved
        random_mllm_on_device(spec, out, "cpu", torch.float32).save_pretrained(out)
        return out
    if "random" in spec:
        return build_random_mllm(spec["random"], out)

    return build_tiny_mllm(spec["family"], out, hidden=spec["hidden"], layers=spec["layers"],
                           image_size=spec["image_size"])


def prepare_inputs(work: Path, shape: str, images: int) -> tuple[Path, Path]:
    """The model and the photo folder of a run under ``work``, built once and then reused."""
    model = work / f"mllm-{shape}"
    if not (model / "config.json").is_file():
        build_model(shape, model)
    folder = work / f"photos-{images}"
    if not folder.is_dir():
        write_photos(folder, images)
    return model, folder


def forward_flops(model_dir: Path, images: Path, sample: int = 16) -> float:
    """Approximate FLOPs of one forward pass of one image and prompt, averaged over the first
    ``sample`` images of ``images`` (see :func:`count_flops`), for the model saved in
    ``model_dir`` (built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from official_stage_one import list_photos

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    processor = AutoProcessor.from_pretrained(model_dir)
    return count_flops(model, processor, list_photos(images)[:sample])


def count_flops(model, processor, paths: list[Path], unused_parameters: int = 0,
                encoding=None) -> float:
    """FLOPs of one forward pass of one image and prompt (see :func:`count_flops_split`)."""
    return sum(count_flops_split(model, processor, paths, unused_parameters, encoding))


def count_flops_split(model, processor, paths: list[Path], unused_parameters: int = 0,
                      encoding=None) -> tuple[float, float]:
    """FLOPs of one forward pass of one image and prompt, averaged over ``paths``, as
    (language model and head, vision tower): the vision part runs once per image when the
    prompts of an image share it (mPLUG-Owl2 with fused prompts).

    2 · parameters · tokens for the language model's layers, 2 · parameters · patches for the
    vision tower (Qwen2-VL's token count follows the image size), and the output head at one
    position. Attention scores are left out (a few per cent at these lengths); mPLUG-Owl2's
    abstractor is counted at the patch count (a slight over-count), so this is an estimate.
    ``unused_parameters``: language-model parameters a token does not run through
    (mPLUG-Owl2's second set of modality-adaptive keys and values). ``encoding``: the
    prompt's ``PromptEncoding`` (default: rendered by the processor's chat template)."""
    from agiqa.models.mllm import PromptEncoding
    from agiqa.presets import load_prompts

    cfg = model.config
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "visual" in n)
    # The embedding is a lookup, and the output head runs at the last position only.
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    language = sum(p.numel() for p in model.parameters()) - vision - embed - head
    language -= unused_parameters
    if encoding is None:
        prompts = load_prompts("paper")
        encoding = PromptEncoding(processor, prompts.texts[0], prompts.answer_prefix,
                                  prompts.rating_words)
    enc = encoding
    total, visual = 0.0, 0.0
    for path in paths:
        inputs = processor(images=[Image.open(path).convert("RGB")], text=[enc.text],
                           return_tensors="pt")
        tokens = inputs["input_ids"].shape[1] + len(enc.suffix_ids)
        if "image_grid_thw" in inputs:
            patches = int(inputs["image_grid_thw"].prod())
        else:  # a fixed-size ViT with a class token (mPLUG-Owl2 keeps its settings apart)
            vc = getattr(cfg, "vision_settings", None) or cfg.vision_config
            patches = (vc.image_size // vc.patch_size) ** 2 + 1
        total += 2.0 * language * tokens + 2.0 * head
        visual += 2.0 * vision * patches
    return total / len(paths), visual / len(paths)


def peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (datasheet), None if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _official(py: str, model: Path, images: Path, out: Path, batch: int) -> dict:
    run = run_process([py, str(HERE / "official_stage_one.py"), "--model", str(model),
                       "--images", str(images), "--out", str(out), "--batch-size", str(batch)])
    run["report"] = json.loads(run.pop("stdout").strip().splitlines()[-1])
    run["load_average"] = load_average()
    return run


def _agiqa(py: str, model: Path, images: Path, cache: Path, batch: int, workers: int | None,
           extra: list[str], src: str | None = None) -> dict:
    """One whole ``extract-semantics`` process; ``workers=None`` leaves the loader processes
    at the CLI's default; ``src``: run the agiqa of that source folder instead."""
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    loader = [] if workers is None else ["--loader-workers", str(workers)]
    env = {"PYTHONPATH": src} if src else None
    run = run_process([py, "-m", "agiqa", "extract-semantics", "--mllm", str(model),
                       "--images", str(images), "--out", str(cache), "--batch-size", str(batch),
                       *loader, "-q", "--json", *extra], env=env)
    run["report"] = json.loads(run.pop("stdout"))
    run["load_average"] = load_average()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loader-workers", type=int, default=None,
                    help="agiqa's --loader-workers (default: the CLI's default, as a user runs)")
    ap.add_argument("--baseline-src", default=None,
                    help="Also time the agiqa of this source folder (e.g. an earlier commit's "
                         "src/, from git archive) at its own defaults, alternating with ours.")
    ap.add_argument("--repeats", type=int, default=2,
                    help="Runs of each; the order alternates (official first in odd runs).")
    ap.add_argument("--fuse-prompts", choices=["default", "on", "off"], default="default",
                    help="agiqa's --fuse-prompts setting (default: the model's).")
    ap.add_argument("--workdir", default=None, help="Keep the model and images here.")
    ap.add_argument("--out", default=None, help="The JSON result (default results/...).")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model, images = prepare_inputs(work, args.shape, args.images)
        official, ours, base = [], [], []
        extra = {"default": [], "on": ["--fuse-prompts"], "off": ["--no-fuse-prompts"]}[
            args.fuse_prompts]
        for r in range(args.repeats):
            steps = [lambda: official.append(_official(py, model, images, work / "official-pt",
                                                       args.batch_size)),
                     lambda: ours.append(_agiqa(py, model, images, work / "agiqa-cache",
                                                args.batch_size, args.loader_workers, extra))]
            if args.baseline_src:
                steps.append(lambda: base.append(_agiqa(
                    py, model, images, work / "baseline-cache", args.batch_size, None, extra,
                    str(Path(args.baseline_src).resolve()))))
            for step in (steps if r % 2 == 0 else steps[::-1]):
                step()
        n = args.images
        off_s = [o["seconds"] for o in official]
        our_s = [o["seconds"] for o in ours]
        report = ours[-1]["report"]
        result = {
            "shape": args.shape, "images": n, "batch_size": args.batch_size,
            "repeats": args.repeats,
            "official": {"process_seconds_each": off_s,
                         "process_seconds_median": statistics.median(off_s),
                         "images_per_second": round(n / statistics.median(off_s), 3),
                         "forward_passes_per_image":
                             official[0]["report"]["forward_passes_per_image"],
                         "cpu_seconds_each": [o["cpu_seconds"] for o in official],
                         "peak_rss_mib": max(o["peak_rss_mib"] for o in official),
                         "load_average_each": [o["load_average"] for o in official]},
            "agiqa": {"process_seconds_each": our_s,
                      "process_seconds_median": statistics.median(our_s),
                      "images_per_second": round(n / statistics.median(our_s), 3),
                      "loop_seconds_each": [o["report"]["seconds"] for o in ours],
                      "forward_passes_per_image": report["forward_passes"] / n,
                      "model_calls": report["model_calls"], "fuse_prompts": args.fuse_prompts,
                      "padding_fraction": report["padding_fraction"],
                      "loader_workers": report.get("loader_workers", args.loader_workers),
                      "loader_workers_setting": "CLI default" if args.loader_workers is None
                      else "set by --loader-workers",
                      "cpu_seconds_each": [o["cpu_seconds"] for o in ours],
                      "peak_rss_mib": max(o["peak_rss_mib"] for o in ours),
                      "load_average_each": [o["load_average"] for o in ours]},
            "speedup_first_run": round(off_s[0] / our_s[0], 3),
            "speedup_each": [round(a / b, 3) for a, b in zip(off_s, our_s, strict=True)],
            "speedup_median": round(statistics.median(off_s) / statistics.median(our_s), 3),
        }
        if base:
            base_s = [o["seconds"] for o in base]
            result["baseline"] = {
                "src": args.baseline_src, "process_seconds_each": base_s,
                "process_seconds_median": statistics.median(base_s),
                "images_per_second": round(n / statistics.median(base_s), 3),
                "cpu_seconds_each": [o["cpu_seconds"] for o in base],
                "load_average_each": [o["load_average"] for o in base]}
            result["against_baseline_median"] = round(
                statistics.median(base_s) / statistics.median(our_s), 3)
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            peak = peak_bf16_tflops(name)
            result["gpu"] = name
            result["bf16_peak_tflops"] = peak
            flops = forward_flops(model, images)
            if peak:
                result["agiqa"]["fraction_of_bf16_peak"] = round(
                    flops * report["forward_passes"] / report["seconds"] / (peak * 1e12), 4)
    suffix = "" if args.fuse_prompts == "default" else f"_fuse_{args.fuse_prompts}"
    write_result(f"stage_one_{args.shape}{suffix}", result, args.out)


if __name__ == "__main__":
    main()
