import numpy as np
import pytest
import torch

from gendd_framework import data  # noqa: F401
from gendd_framework.errors import ConfigError
from gendd_framework.registry import DATASETS


def _labels(ds):
    return np.array([int(ds[i][1]) for i in range(len(ds))])


def test_digits_splits_are_stratified_disjoint_and_fixed():
    a = DATASETS.build({"name": "digits", "augment": False})
    b = DATASETS.build({"name": "digits", "augment": False})
    sizes = [len(a.train), len(a.val), len(a.test)]
    assert sum(sizes) == 1797 and a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert torch.equal(a.test.images, b.test.images)  # same seed -> same split
    for split in (a.val, a.test):
        counts = np.bincount(_labels(split), minlength=10) / len(split)
        assert np.all(np.abs(counts - 0.1) < 0.03)  # every class about 10%
    mean = a.train.images.mean().item()
    assert abs(mean) < 1e-5, "standardised with training statistics"


def test_digits_split_indices_do_not_overlap():
    from gendd_framework.data.base import stratified_split

    labels = np.repeat(np.arange(10), 30)
    test, val, train = stratified_split(labels, [0.2, 0.1], seed=3)
    assert len(set(test) | set(val) | set(train)) == 300
    assert len(test) == 60 and len(val) == 30


def test_train_fraction_keeps_a_stratified_subset():
    full = DATASETS.build({"name": "digits"})
    half = DATASETS.build({"name": "digits", "train_fraction": 0.5})
    assert abs(len(half.train) - len(full.train) / 2) <= 10
    assert torch.equal(half.test.labels, full.test.labels)


def test_augmentation_only_on_train():
    splits = DATASETS.build({"name": "digits", "augment": True, "noise_std": 0.5})
    x1, _ = splits.train[0]
    x2, _ = splits.train[0]
    assert not torch.equal(x1, x2)
    v1, _ = splits.val[0]
    v2, _ = splits.val[0]
    assert torch.equal(v1, v2)


@pytest.mark.parametrize(
    "name,folder", [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")]
)
def test_missing_cifar_files_name_the_expected_path(tmp_path, name, folder):
    with pytest.raises(ConfigError) as err:
        DATASETS.build({"name": name, "root": str(tmp_path)})
    assert str(tmp_path / folder) in str(err.value) and "Nothing is downloaded" in str(err.value)


def test_missing_imagefolder_names_the_expected_path(tmp_path):
    with pytest.raises(ConfigError, match="train"):
        DATASETS.build({"name": "imagefolder", "root": str(tmp_path)})


def test_imagefolder_reads_local_images_and_carves_val(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (40, 40), color=(i * 20, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    splits = DATASETS.build({"name": "imagefolder", "root": str(tmp_path), "size": 32, "val_fraction": 0.2})
    assert splits.num_classes == 2 and len(splits.val) == 4 and len(splits.train) == 16
    x, y = splits.val[0]
    assert x.shape == (3, 32, 32)


def test_random_shift_moves_pixels_and_zero_fills():
    from gendd_framework.data.digits import RandomShift

    x = torch.arange(1.0, 17.0).view(1, 4, 4)
    for seed in range(3):  # seeds 0..2 draw the shifts (1, -1), (0, 1), (-1, -1)
        g = torch.Generator().manual_seed(seed)
        dy, dx = torch.randint(-1, 2, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        out = RandomShift(max_shift=1, noise_std=0.0, generator=g)(x.clone())
        expected = torch.zeros_like(x)
        src = x[..., max(0, -dy) : 4 - max(0, dy), max(0, -dx) : 4 - max(0, dx)]
        expected[..., max(0, dy) : 4 - max(0, -dy), max(0, dx) : 4 - max(0, -dx)] = src
        assert torch.equal(out, expected), (seed, dy, dx)
        assert (dy, dx) == (0, 0) or not torch.equal(out, x)
