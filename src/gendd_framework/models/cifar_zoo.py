"""Importing this module registers the whole CIFAR model zoo with `MODELS`."""

from gendd_framework.models import (  # noqa: F401
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_shufflenet,
    cifar_vgg,
    cifar_wrn,
)
