"""`protocol=literature` (data.val_fraction 0): every training image trains and the per-epoch
validation is the test split, so the selected epoch is the best test epoch, as the published tables."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from gendd_framework import config as config_lib
from gendd_framework.analysis import published
from gendd_framework.data.base import DataSplits, carve
from gendd_framework.data.digits import digits


def test_carve_holds_nothing_out_at_fraction_zero():
    images = TensorDataset(torch.arange(20.0), torch.arange(20) % 4)
    train, val, plain = carve(images, images, [int(y) for y in torch.arange(20) % 4], 0.0, seed=0)
    assert val is None and len(train) == len(plain) == 20
    held = carve(images, images, [int(y) for y in torch.arange(20) % 4], 0.2, seed=0)
    assert len(held[0]) == 16 and len(held[1]) == 4  # the default protocol still holds out


def test_splits_without_val_validate_on_the_test_split():
    test = TensorDataset(torch.zeros(3))
    splits = DataSplits(TensorDataset(torch.zeros(5)), None, test, num_classes=2, input_shape=(1,))
    assert splits.val is test and splits.val_is_test
    held = DataSplits(TensorDataset(torch.zeros(5)), TensorDataset(torch.zeros(2)), test, 2, (1,))
    assert held.val is not test and not held.val_is_test


def test_digits_trains_on_every_non_test_image():
    held, literature = digits(val_fraction=0.15), digits(val_fraction=0.0)
    assert literature.val is literature.test and literature.val_is_test
    assert len(literature.train) == len(held.train) + len(held.val)
    assert len(literature.test) == len(held.test)
    assert torch.equal(literature.test.labels, held.test.labels)  # the same test split


def test_literature_preset_composes_and_validates(compose):
    cfg = compose(["experiment=cifar100/resnet32x4_resnet8x4", "method=dkd", "protocol=literature"])
    assert cfg.data.val_fraction == 0
    config_lib.validate(config_lib.apply_recipe(cfg))
    assert published.selection(cfg) == "test"
    assert published.selection(compose(["experiment=cifar100/resnet32x4_resnet8x4"])) == "val"


def test_a_literature_run_selects_its_best_epoch_on_test(compose, tmp_path):
    """The summary's `test` is the selected epoch's test accuracy and equals its `val` record (the
    validation split *is* the test split); `test_last` is the last epoch's."""
    from gendd_framework.pipeline import run

    tiny = ["teacher.train.epochs=1", "data.train_fraction=0.3"]
    summary = run(compose(["experiment=digits/kd", "protocol=literature", *tiny]), tmp_path)
    record = summary["distill"]
    assert record["val"]["acc/student"] == record["test"]["acc/student"]
    assert set(record["test_last"]) == set(record["test"])
