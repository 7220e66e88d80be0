"""CIFAR-10/100 (torchvision's python-pickle layout) and ImageFolder (ImageNet layout), local files only."""

from __future__ import annotations

from pathlib import Path

from gendd_framework.data.base import DataSplits, carve
from gendd_framework.errors import ConfigError
from gendd_framework.registry import DATASETS

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def cifar_train(mean=CIFAR_STATS["cifar100"][0], std=CIFAR_STATS["cifar100"][1], padding: int = 4):
    """RandomCrop(32, padding) + horizontal flip + normalise: the RepDistiller/mdistiller protocol."""
    import torchvision.transforms as T

    return T.Compose(
        [T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )


def cifar_eval(mean=CIFAR_STATS["cifar100"][0], std=CIFAR_STATS["cifar100"][1]):
    """ToTensor + normalise."""
    import torchvision.transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def imagenet_train(size: int = 224, crop_scale: float = 0.08, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1]):
    """RandomResizedCrop(scale=(crop_scale, 1)) + flip + normalise (GenDD's ImageNet stage 2 uses 0.6)."""
    import torchvision.transforms as T

    crop = T.RandomResizedCrop(size, scale=(crop_scale, 1.0))
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def imagenet_eval(size: int = 224, resize: int = 256, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1]):
    """Resize(256) + CenterCrop(224) + normalise."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(
            f"{what} not found at {path}. Nothing is downloaded: place the files there or set data.root=..."
        )


def _cifar(variant: str, root: str, val_fraction: float, split_seed: int, augment: bool) -> DataSplits:
    import torchvision

    root_path = Path(root).expanduser()
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[variant]
    _require(root_path / folder, f"{variant} (torchvision python format, folder '{folder}')")
    cls = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = CIFAR_STATS[variant]
    plain_tf = cifar_eval(mean, std)
    train_tf = cifar_train(mean, std) if augment else plain_tf
    train_aug = cls(str(root_path), train=True, transform=train_tf, download=False)
    train_plain = cls(str(root_path), train=True, transform=plain_tf, download=False)
    test = cls(str(root_path), train=False, transform=plain_tf, download=False)
    train, val, plain = carve(train_aug, train_plain, train_aug.targets, val_fraction, split_seed)
    return DataSplits(
        train, val, test, num_classes=len(train_aug.classes), input_shape=(3, 32, 32), train_plain=plain
    )


@DATASETS.register("cifar10")
def cifar10(root: str = "data/cifar", val_fraction: float = 0.1, split_seed: int = 0, augment: bool = True):
    """CIFAR-10 from local files; a stratified `val_fraction` of train is held out for model selection."""
    return _cifar("cifar10", root, val_fraction, split_seed, augment)


@DATASETS.register("cifar100")
def cifar100(root: str = "data/cifar", val_fraction: float = 0.1, split_seed: int = 0, augment: bool = True):
    """CIFAR-100 from local files; a stratified `val_fraction` of train is held out for model selection."""
    return _cifar("cifar100", root, val_fraction, split_seed, augment)


@DATASETS.register("imagefolder")
def imagefolder(
    root: str = "data/imagenet",
    train_dir: str = "train",
    test_dir: str = "val",
    val_fraction: float = 0.01,
    split_seed: int = 0,
    size: int = 224,
    crop_scale: float = 0.08,
):
    """ImageNet layout (`root/train/<class>/*`, `root/val/<class>/*`); `val/` is the test split, and
    model selection uses a stratified `val_fraction` carved from `train/`."""
    import torchvision

    root_path = Path(root).expanduser()
    for sub in (train_dir, test_dir):
        _require(root_path / sub, f"image folder '{sub}/' (one sub-folder per class)")
    train_aug = torchvision.datasets.ImageFolder(str(root_path / train_dir), imagenet_train(size, crop_scale))
    train_plain = torchvision.datasets.ImageFolder(str(root_path / train_dir), imagenet_eval(size))
    test = torchvision.datasets.ImageFolder(str(root_path / test_dir), imagenet_eval(size))
    train, val, plain = carve(train_aug, train_plain, train_aug.targets, val_fraction, split_seed)
    shape = (3, size, size)
    return DataSplits(
        train, val, test, num_classes=len(train_aug.classes), input_shape=shape, train_plain=plain
    )
