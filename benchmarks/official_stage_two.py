"""A faithful re-implementation of the official MA-AGIQA training loop, as the baseline.

The official code trains in float32 with batches of 8. Every sample of every epoch decodes its
image and resizes it to 224×224 (OpenCV ``INTER_CUBIC``; here PIL decoding and the same bicubic
resize on torch), normalises and augments it in NumPy, and loads its two semantic vectors from
two ``.pt`` files. The model runs the whole ViT (all blocks and the classification head) with
forward hooks on every block. Each epoch ends with a validation pass that decodes again.

    python benchmarks/official_stage_two.py --root IMAGES --labels labels.csv \
        --features FEATURES --epochs 2 --backbone tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from agiqa.data.pixels import read_pixels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_model import OfficialMAAGIQA  # noqa: E402

# The official module for each agiqa backbone preset (same widths, depth and used blocks).
BACKBONES = {
    "vit_base_patch8_224": {},
    "tiny": {"embed_dim": 32, "vit_dim": 16, "vit_heads": 2, "dim_mlp": 32, "vit_depth": 4,
             "vit_mlp_ratio": 2.0, "feature_blocks": (0, 1, 2, 3)},
}


class OfficialDataset(Dataset):
    def __init__(self, root: Path, rows: list[tuple[str, float]], features: Path, train: bool):
        self.root, self.rows, self.features, self.train = root, rows, features, train

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        name, mos = self.rows[i]
        img = read_pixels(self.root / name).numpy().astype(np.float32) / 255.0  # decode + resize
        img = (img - 0.5) / 0.5
        if self.train:
            if random.random() < 0.7:
                img = np.rot90(img, random.randint(1, 3), axes=(1, 2))
            if random.random() < 0.7:
                img = np.fliplr(img)  # on CHW: the H axis, as the official code
        stem = Path(name).stem
        a = torch.load(self.features / "prompt0" / f"{stem}.pt")
        b = torch.load(self.features / "prompt1" / f"{stem}.pt")
        return torch.from_numpy(np.ascontiguousarray(img)), a, b, torch.tensor(mos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="vit_base_patch8_224")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    with open(args.labels, newline="", encoding="utf-8") as f:
        rows = [(r["image"], float(r["mos"])) for r in csv.DictReader(f)]
    order = list(range(len(rows)))
    random.seed(20)
    random.shuffle(order)
    n_train, n_val = round(0.7 * len(rows)), round(0.1 * len(rows))
    train = [rows[i] for i in order[:n_train]]
    val = [rows[i] for i in order[n_train : n_train + n_val]]
    root, features = Path(args.root), Path(args.features)
    train_loader = DataLoader(OfficialDataset(root, train, features, True), args.batch_size,
                              shuffle=True, num_workers=args.workers, drop_last=True)
    val_loader = DataLoader(OfficialDataset(root, val, features, False), args.batch_size,
                            shuffle=False, num_workers=args.workers)
    torch.manual_seed(20)
    net = OfficialMAAGIQA(semantic_dim=args.dim, **BACKBONES[args.backbone]).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=1e-5, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=50, eta_min=0)
    loss_fn = torch.nn.MSELoss()
    epochs = []
    for _ in range(args.epochs):
        t = time.perf_counter()
        net.train()
        seen = 0
        for x, a, b, y in train_loader:
            x, a, b, y = x.to(device), a.to(device), b.to(device), y.float().to(device)
            pred = net(x, a, b)
            loss = loss_fn(pred, y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t
        net.eval()
        with torch.no_grad():
            for x, a, b, _ in val_loader:
                net(x.to(device), a.to(device), b.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        epochs.append({"train_seconds": round(train_seconds, 3),
                       "seconds": round(time.perf_counter() - t, 3),
                       "train_images_per_second": round(seen / train_seconds, 2)})
    print(json.dumps({"train": len(train), "val": len(val), "epochs": epochs,
                      "seconds": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    main()
