"""A faithful re-implementation of the official MA-AGIQA stage-one loop, as the baseline.

The official code walks the whole image list once per prompt, in batches of 8; for every batch
it runs one forward pass for the rating logits (all positions) and a second one with
``output_hidden_states=True`` for the semantic vector (mean of the last hidden state), decodes
the images in the main thread, and saves one ``.pt`` file per image and prompt.

    python benchmarks/official_stage_one.py --model MLLM_DIR --images DIR --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import types
from pathlib import Path
from typing import Any

import torch
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_photos(folder: str | Path) -> list[Path]:
    """The image files under ``folder``, sorted (as the official code walks them)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTS)


@contextlib.contextmanager
def official_multiway(model: Any):
    """mPLUG-Owl2's modality-adaptive modules as the official code runs them
    (``mplug_owl2/model/multiway.py``): every module finds the tokens of each branch with
    ``nonzero``, a host synchronisation per module and branch. No-op for other families."""
    try:
        from agiqa.models.mllm.mplug_owl2 import MultiwayNetwork
    except ImportError:  # an agiqa without the family
        MultiwayNetwork = ()  # noqa: N806
    modules = [m for m in model.modules() if isinstance(m, MultiwayNetwork)]

    def forward(self, hidden_states, route):
        out = hidden_states.new_empty(*hidden_states.shape[:-1], self.out_features)
        for idx, subway in enumerate(self.multiway):
            local = route.modality.eq(idx).nonzero(as_tuple=True)
            hidden = hidden_states[local].unsqueeze(1).contiguous()
            if hidden.numel():
                out[local] = subway(hidden).squeeze(1)
        return out.contiguous()

    for m in modules:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def official_loop(model: Any, processor: Any, paths: list[Path], out: Path,
                  batch_size: int = 8, texts: list[str] | None = None) -> int:
    """The official loop over ``paths`` with a loaded ``model``; returns the forward passes.

    ``processor.tokenizer.padding_side`` must be ``left``. Vectors go to ``out`` as one ``.pt``
    file per image and prompt. ``texts``: the whole text of each prompt (answer prefix
    included), e.g. as agiqa renders it; default: the processor's chat template, the prompt
    before the image.
    """
    from agiqa.presets import load_prompts

    device = next(model.parameters()).device
    prompts = load_prompts("paper")
    out.mkdir(parents=True, exist_ok=True)
    with official_multiway(model):
        return _loop(model, processor, paths, out, batch_size, texts, prompts, device)


def _loop(model, processor, paths, out, batch_size, texts, prompts, device) -> int:
    owl2 = getattr(model.config, "model_type", None) == "mplug_owl2"
    forwards = 0
    for pi, prompt in enumerate(prompts.texts):
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                  {"type": "image"}]}]
        text = texts[pi] if texts else processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False) + " " + prompts.answer_prefix
        for i in range(0, len(paths), batch_size):
            batch = paths[i : i + batch_size]
            images = [Image.open(p).convert("RGB") for p in batch]
            inputs = processor(images=images, text=[text] * len(images), return_tensors="pt",
                               padding=True)
            if owl2 and bool(inputs["attention_mask"].all()):
                del inputs["attention_mask"]  # getFeature.py passes none
            inputs = inputs.to(device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                logits = model(**inputs).logits  # forward 1: rating logits, every position
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # 2
            forwards += 2 * len(batch)
            _ = torch.softmax(logits[:, -1].float(), -1)
            vectors = hidden.float().mean(1).cpu()
            for p, v in zip(batch, vectors, strict=True):
                torch.save(v.clone(), out / f"{p.stem}_prompt{pi}.pt")
    return forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = ap.parse_args()
    t0 = time.perf_counter()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from agiqa.models.mllm.mplug_owl2 import is_mplug_owl2, load_mplug_owl2
    from agiqa.presets import load_prompts, load_recipe

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    texts = None
    if is_mplug_owl2(args.model):  # the official turn of getFeature.py
        model, processor = load_mplug_owl2(args.model, dtype=dtype)
        turn, prompts = load_recipe("mplug-owl2-official").turn, load_prompts("paper")
        texts = [turn.replace("{prompt}", p) + " " + prompts.answer_prefix
                 for p in prompts.texts]
    else:
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    processor.tokenizer.padding_side = "left"
    model = model.to(device).eval()
    paths = list_photos(args.images)
    forwards = official_loop(model, processor, paths, Path(args.out), args.batch_size, texts)
    seconds = time.perf_counter() - t0
    print(json.dumps({"images": len(paths), "forward_passes_per_image": forwards / len(paths),
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
