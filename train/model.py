"""ResNet18 with a one-logit head, and the three ways to initialise its backbone."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18


class WeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded."""


def build_model(pretrained: str = "none", freeze: str = "none") -> nn.Module:
    """torchvision resnet18 with `fc` replaced by one logit.

    pretrained: "imagenet" (torchvision's weights API; needs internet or a filled torch cache),
    "none" (random init), or a path to a local state dict (.pth) for air-gapped sites.
    freeze: "backbone" trains only the new head; "none" fine-tunes everything.
    """
    if pretrained == "imagenet":
        try:
            model = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
        except Exception as e:  # noqa: BLE001 - urllib/OSError/hash errors all mean "no weights"
            raise WeightsError(
                f"could not load torchvision's ImageNet weights for resnet18 ({e}). This machine "
                "is probably offline. Either pass a local state dict with --pretrained PATH.pth "
                "(e.g. resnet18-f37072fd.pth copied from a machine with internet), or train from "
                "scratch with --pretrained none.") from e
    elif pretrained == "none":
        model = resnet18(weights=None)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsError(f"--pretrained {pretrained}: no such file. Use imagenet, none, or "
                               "the path of a resnet18 state dict (.pth).")
        model = resnet18(weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path}: not a loadable state dict ({e})") from e
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: holds a {type(state).__name__}, not a resnet18 state "
                               "dict (a mapping of parameter names to tensors)")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # right names, wrong shapes: another architecture
            detail = str(e).splitlines()[-1].strip()
            raise WeightsError(f"{path}: not a resnet18 state dict ({detail})") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(f"{path}: not a resnet18 state dict (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    model.fc = nn.Linear(model.fc.in_features, 1)
    if freeze == "backbone":
        if pretrained == "none":
            warnings.warn("freezing a randomly initialised backbone: only the head will learn, "
                          "on random features. Use --freeze none or pretrained weights.",
                          stacklevel=2)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    elif freeze != "none":
        raise ValueError(f"freeze must be 'backbone' or 'none', got {freeze!r}")
    return model
