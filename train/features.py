"""Frozen-backbone feature cache: run the backbone once per image and view, train the head on that.

With `--freeze backbone` the backbone is a fixed function (its BatchNorm layers stay in eval mode,
so nothing in it changes), and the network is `fc(backbone(x))`. The naive loop pays a full
ResNet18 forward per image per epoch to feed a 513-parameter head. The cache computes
`backbone(view)` for `views` augmented views of every training image and the single eval view of
every validation image, once; each epoch then picks one cached view per image and only the head
runs -- microseconds instead of a ResNet forward.

Same result as the naive loop up to augmentation sampling: cached view v of an image is exactly
the augmentation the naive loop draws in epoch v + 1 (see `data.TrainViews`); the cached loop
draws views at random each epoch instead of a fresh augmentation. Every cached view is augmented
-- none is the plain eval view -- because the naive loop never trains on un-augmented images
either. The whole run costs about
`views / epochs` of the naive one, so keep views well below the epoch count.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .data import TrainViews, chunks, epoch_order, seed_for, view_batches


def backbone(model: nn.Module) -> nn.Module:
    """Everything of a torchvision ResNet but `fc`: image batch -> (N, 512) features."""
    return nn.Sequential(*[m for name, m in model.named_children() if name != "fc"], nn.Flatten(1))


@torch.inference_mode()
def extract(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            device: torch.device, amp: bool = False, channels_last: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Run `net` (in eval mode) over image batches -> float32 features on `device`."""
    net.eval()
    out = []
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp):
            out.append(net(x).float())
        if progress:
            progress(len(x))
    return torch.cat(out)


def view_cache(model: nn.Module, views: TrainViews, n_views: int, batch_size: int,
               device: torch.device, workers: int = 0, amp: bool = False,
               channels_last: bool = False, progress: Optional[Callable[[int, int], None]] = None
               ) -> torch.Tensor:
    """(n_views, N, 512) backbone features of views 0..n_views-1 of every training image."""
    net = backbone(model)
    n, done = len(views), 0
    feats = []
    for v in range(n_views):
        loader = torch.utils.data.DataLoader(
            views, batch_sampler=view_batches(range(n), batch_size, v, training=False),
            num_workers=workers, pin_memory=device.type == "cuda")

        def step(k: int) -> None:
            nonlocal done
            done += k
            if progress:
                progress(done, n * n_views)

        feats.append(extract(net, loader, device, amp, channels_last, step))
    return torch.stack(feats)


def cached_batches(feats: torch.Tensor, targets: torch.Tensor, seed: int, epoch: int,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of head-training batches: the naive loop's order, one random view per image."""
    n_views, n = feats.shape[:2]
    order = epoch_order(n, seed, epoch)
    pick = torch.randint(n_views, (n,), generator=torch.Generator().manual_seed(
        seed_for(seed, epoch, 1)))
    pick, order, targets = pick.to(feats.device), order.to(feats.device), targets.to(feats.device)
    sizes = [len(b) for b in chunks(range(n), batch_size)]  # the naive loop's batch sizes
    for idx in order[:sum(sizes)].split(sizes):
        yield feats[pick[idx], idx], targets[idx]
