"""fxscore.train.model: ResNet18 with one logit, three initialisations, frozen or not."""
from __future__ import annotations

import urllib.error
import warnings

import pytest

torch = pytest.importorskip("torch")

from torchvision.models import resnet18  # noqa: E402

from fxscore.train.model import WeightsError, build_model  # noqa: E402

pytestmark = pytest.mark.torch


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_one_logit_head_and_full_fine_tuning():
    model = build_model("none", "none").eval()
    assert model.fc.out_features == 1
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1)
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_frozen_backbone_trains_only_the_head_and_warns_when_random():
    with pytest.warns(UserWarning, match="randomly initialised backbone"):
        model = build_model("none", "backbone")
    assert trainable(model) == {"fc.weight", "fc.bias"}


def test_local_state_dict_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pretrained + frozen: nothing to warn about
        model = build_model(str(path), "backbone")
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert model.fc.out_features == 1


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    (b"not a pickle", "not a loadable state dict"),
    ({"conv1.weight": torch.zeros(1)}, "not a resnet18 state dict.*conv1.weight"),
    ({"features.0.weight": torch.zeros(1)}, "not a resnet18 state dict.*missing"),
    (torch.zeros(3), "holds a Tensor"),
])
def test_bad_local_weights(tmp_path, content, match):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=match):
        build_model(str(path))


def test_offline_imagenet_names_both_alternatives(monkeypatch, tmp_path):
    """No internet and no torch cache: a clear error, not a urllib traceback."""
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        build_model("imagenet")
    assert "--pretrained PATH.pth" in str(e.value) and "--pretrained none" in str(e.value)
