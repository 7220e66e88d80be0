"""The audited recipe table (src/gendd_framework/analysis/published_recipes.yaml) against what a run resolves.

For every row, `experiment=<recipe> method=<method>` is composed and merged with the method's
`per_recipe` entry exactly as a run does, and every official value must resolve unchanged, except the
documented deviations, which must resolve to the value we say we run (and not to the official one).
The coverage lists below are the (method, pair) sets the upstream configs and scripts publish, written
out by hand from the sources, so a missing row fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from gendd_framework import config as config_lib
from gendd_framework.analysis import published
from gendd_framework.cli import config_dir

ROWS = published.load()
ROOT = Path(__file__).resolve().parents[1]
CRD_PAIRS = [  # RepDistiller README, both tables: the 13 CIFAR-100 pairs of the CRD paper
    "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20", "resnet110_resnet32",
    "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_mobilenetv2", "resnet50_mobilenetv2", "resnet50_vgg8",
    "resnet32x4_shufflev1", "resnet32x4_shufflev2", "wrn_40_2_shufflev1",
]  # fmt: skip
DKD_PAIRS = [  # mdistiller configs/cifar100/dkd/*.yaml (11 files)
    "resnet110_resnet32", "resnet32x4_resnet8x4", "resnet32x4_shufflev1", "resnet32x4_shufflev2",
    "resnet50_mobilenetv2", "resnet56_resnet20", "vgg13_mobilenetv2", "vgg13_vgg8", "wrn_40_2_shufflev1",
    "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1",
]  # fmt: skip
ND_PAIRS = [  # the ND repository's CIFAR scripts (KD++, DKD++, DIST++, ReviewKD++)
    "resnet56_resnet20", "resnet32x4_resnet8x4", "wrn_40_2_wrn_40_1", "resnet50_mobilenetv2",
    "resnet32x4_shufflev1", "resnet32x4_shufflev2",
]  # fmt: skip
LS_PAIRS = [  # logit standardisation: README tables whose pair has a recipe here (log file per pair)
    "resnet32x4_resnet8x4", "vgg13_vgg8", "wrn_40_2_wrn_40_1", "wrn_40_2_wrn_16_2", "resnet56_resnet20",
    "resnet110_resnet32", "resnet110_resnet20", "resnet32x4_shufflev2", "vgg13_mobilenetv2",
    "resnet50_mobilenetv2",
]  # fmt: skip
REVIEWKD_PAIRS = [  # ReviewKD CIFAR-100/script/reviewKD.sh (+ mdistiller configs/cifar100/reviewkd.yaml)
    "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "wrn_40_2_shufflev1", "resnet32x4_resnet8x4",
    "resnet32x4_shufflev1", "resnet32x4_shufflev2", "resnet56_resnet20", "resnet110_resnet32",
]  # fmt: skip
DIST_PAIRS = [  # DIST_KD README, CIFAR-100 table
    "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet32x4_resnet8x4", "resnet50_mobilenetv2",
    "resnet32x4_shufflev1", "resnet32x4_shufflev2",
]  # fmt: skip
GENDD_PAIRS = [  # GenDD_cifar/sh/train_*_gendd.sh
    "resnet110_resnet32", "resnet56_resnet20", "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_resnet20",
    "wrn_40_2_resnet8x4", "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1",
]  # fmt: skip
IMAGENET = ["imagenet/resnet34_resnet18", "imagenet/resnet50_mobilenet"]


def published_pairs() -> set[tuple[str, str]]:
    """(method preset, recipe) for everything the upstream configs and scripts publish."""
    cifar = lambda pairs: [f"cifar100/{p}" for p in pairs]  # noqa: E731
    expected = {
        (m, r)
        for m in ("ce", "kd", "fitnet", "at", "sp", "vid", "rkd", "pkt", "crd")
        for r in cifar(CRD_PAIRS)
    }
    expected |= {("dkd", r) for r in cifar(DKD_PAIRS)}
    expected |= {(m, r) for m in ("kd", "dkd", "at", "crd", "reviewkd") for r in IMAGENET}  # mdistiller
    expected |= {("reviewkd", r) for r in cifar(REVIEWKD_PAIRS)}
    expected |= {
        (m, r) for m in ("wkd_l", "wkd_f") for r in cifar(["resnet32x4_resnet8x4", "wrn_40_2_shufflev1"])
    }
    expected |= {(m, r) for m in ("wkd_l", "wkd_f", "dist", "nd", "nd_dkd", "reviewkd_nd") for r in IMAGENET}
    expected |= {("dist", r) for r in cifar(DIST_PAIRS)}
    expected |= {(m, r) for m in ("kd_ls", "dkd_ls") for r in cifar(LS_PAIRS)} | {("kd_ls", IMAGENET[0])}
    expected |= {(m, r) for m in ("nd", "nd_dkd", "nd_dist", "reviewkd_nd") for r in cifar(ND_PAIRS)}
    expected |= {("gendd", r) for r in cifar(GENDD_PAIRS) + IMAGENET}
    expected |= {("projector_ensemble", "cifar100/resnet32x4_resnet8x4"), ("projector_ensemble", IMAGENET[0])}
    return expected | {("ofa", "cifar100/resnet32x4_vit_tiny")}


@pytest.fixture(scope="module")
def hydra_context():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield


def resolve(row: published.Recipe):
    """What a run of this row resolves (the recipe's pair protocol, the method's per-recipe values)."""
    overrides = [f"method={row.method}"] + ([f"experiment={row.experiment}"] if row.experiment else [])
    return config_lib.apply_recipe(hydra_compose(config_name="train", overrides=overrides), overrides)


def test_the_table_covers_every_published_method_pair():
    keys = {(r.method, r.recipe) for r in ROWS}
    assert published_pairs() - keys == set()
    assert len(ROWS) >= len(published_pairs())


def test_every_method_preset_has_a_row():
    """A new conf/method preset needs its audit row (or a row saying nothing is published)."""
    presets = {p.stem for p in (config_dir() / "method").glob("*.yaml")}
    assert presets - {r.method for r in ROWS} == set()
    assert {r.method for r in ROWS} - presets == set()


def test_rows_name_real_recipes_sources_and_reasons():
    experiments = {p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
                   for p in (config_dir() / "experiment").rglob("*.yaml")}  # fmt: skip
    for row in ROWS:
        assert row.experiment is None or row.experiment in experiments, row.key
        assert (row.recipe is None) == (row.experiment is None), row.key
        assert not row.files or (row.repo and len(row.commit) == 7), row.key
        assert row.top1 is None or (row.paper and 40.0 < row.top1 < 90.0), row.key
        assert all(d["why"] for d in row.deviations.values()), row.key
        assert row.values or row.notes, f"{row.key}: a row without values must say why"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.method}@{r.recipe}")
def test_resolved_recipe_matches_the_published_settings(hydra_context, row):
    cfg = resolve(row)
    for path, official in row.values.items():
        value = published.resolved(cfg, path)
        if path in row.deviations:
            ours = row.deviations[path]["ours"]
            assert published.same(value, ours), (
                f"{path}: resolves to {value!r}, the table says we run {ours!r}"
            )
            assert not published.same(value, official), f"{path}: no longer deviates; drop the deviation"
        else:
            assert published.same(value, official), f"{path}: resolves to {value!r}, published {official!r}"
    assert published.compare(row, cfg).changed == []


@pytest.mark.parametrize(
    ("experiment", "method", "path", "value"),
    [  # the divergences this audit fixed (each also a table row)
        ("cifar100/vgg13_mobilenetv2", "dkd", "method.beta", 6.0),  # mdistiller dkd/vgg13_mv2.yaml (was 8)
        (
            "cifar100/wrn_40_2_shufflev1",
            "wkd_l",
            "method.wkd_weight",
            200.0,
        ),  # WKD wkd_l/wrn40_2_shuv1.yaml (600)
        ("cifar100/wrn_40_2_shufflev1", "wkd_l", "method.temperature", 6.0),  # (was 8)
        ("cifar100/resnet32x4_resnet8x4", "dist", "method.temperature", 4.0),  # dist_t4
        ("imagenet/resnet34_resnet18", "dist", "method.temperature", 1.0),  # kd: dist
        (None, "meal_v2", "method.discriminator", True),  # MEAL-V2 train.py always uses it (was off)
        ("cifar100/resnet56_resnet20", "dkd_ls", "method.beta", 36.0),  # log dkd,resnet56,resnet20,3,18,2.0
        (
            "imagenet/resnet50_mobilenet",
            "kd",
            "method.temperature",
            1.0,
        ),  # mdistiller r50_mv1/kd.yaml (was 4)
    ],
)
def test_fixed_divergences(hydra_context, experiment, method, path, value):
    overrides = [f"method={method}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = config_lib.apply_recipe(hydra_compose(config_name="train", overrides=overrides), overrides)
    assert published.same(published.resolved(cfg, path), value)


def test_a_wrong_value_is_caught(hydra_context):
    """The comparison is not vacuous: a run with another beta is reported as `changed`."""
    row = published.find("cifar100/vgg13_vgg8", "dkd")
    overrides = ["experiment=cifar100/vgg13_vgg8", "method=dkd", "method.beta=8"]
    cfg = config_lib.apply_recipe(hydra_compose(config_name="train", overrides=overrides), overrides)
    assert published.compare(row, cfg).changed == ["method.beta"]


def test_docs_recipes_page_embeds_the_current_table():
    """docs/recipes.md is regenerated with `python -m gendd_framework.analysis.published docs/recipes.md`."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert published.embed(doc, published.render_markdown()) == doc
