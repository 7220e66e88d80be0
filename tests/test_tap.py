import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.models import FeatureTap, build_model


@pytest.mark.parametrize(
    "spec,shape,dim",
    [
        ({"name": "resnet8x4"}, (2, 3, 32, 32), 256),
        ({"name": "tv:resnet18"}, (2, 3, 64, 64), 512),
        ({"name": "tv:mobilenet_v3_small"}, (2, 3, 64, 64), 1024),
        ({"name": "timm:test_resnet"}, (2, 3, 64, 64), None),
        ({"name": "small_cnn"}, (2, 1, 8, 8), 128),
    ],
)
def test_feature_is_the_classifier_input(spec, shape, dim):
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10).eval()
    tap = FeatureTap(model, ["feature"])
    out = tap(torch.randn(shape))
    feat = out["feature"]
    if dim is not None:
        assert feat.shape == (2, dim)
    assert tap.classifier_weight.shape == (10, feat.shape[1])
    w, b = tap.classifier.weight, tap.classifier.bias
    assert torch.allclose(out["logits"], feat @ w.T + b, atol=1e-5)


def test_module_paths_and_bad_path():
    model = build_model({"name": "resnet20"}, num_classes=10).eval()
    tap = FeatureTap(model, ["feature", "stem"])
    out = tap(torch.randn(1, 3, 32, 32))
    assert out["stem"].shape == (1, 16, 32, 32)
    with pytest.raises(ConfigError, match="module path 'layer9' not found"):
        FeatureTap(model, ["layer9"])


def test_classifier_not_duplicated_in_state_dict():
    tap = FeatureTap(build_model({"name": "mlp"}, num_classes=10))
    assert not any(k.startswith("classifier") for k in tap.state_dict())
