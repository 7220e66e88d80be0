"""gendd-framework: declarative knowledge distillation with Generative Distribution Distillation."""

import os

# Before timm/huggingface_hub are imported anywhere: never touch the network for weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
