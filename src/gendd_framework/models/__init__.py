"""Model zoo: small digits models, the CIFAR zoo, torchvision/timm passthrough, and FeatureTap."""

from gendd_framework.models import cifar_zoo, external, small  # noqa: F401  (registration side effects)
from gendd_framework.models.builder import build_model, load_state_dict_file
from gendd_framework.models.tap import FeatureTap, feature_dim, find_classifier

__all__ = ["FeatureTap", "build_model", "feature_dim", "find_classifier", "load_state_dict_file"]
