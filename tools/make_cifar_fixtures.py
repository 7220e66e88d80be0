"""Generate the CIFAR zoo's test oracle from the official model code (RepDistiller / mdistiller).

    python tools/make_cifar_fixtures.py \
        --repdistiller /path/to/RepDistiller --mdistiller /path/to/mdistiller

Each path is a checkout or a (bare) git directory of the upstream repository; the model files are read
at the checkout's commit (or `--repdistiller-commit` / `--mdistiller-commit`) into a temporary folder
and imported from there, so nothing upstream is vendored into this project. For every architecture in
`ARCHS` the script writes `tests/fixtures/cifar_official/<arch>.json` holding:

- where it came from: upstream repository, commit, file and factory (and which other upstream built the
  same network with the same result, `cross_checked`);
- the official state dict's keys and shapes, in order, the seed from which `synthetic_weights`
  regenerates its values and one variance scale per BN (`calibrate_bn`, computed on the official
  model); no weights are stored: the test rebuilds them, writes an official-format
  `{'model': state_dict}` checkpoint and loads it through the framework;
- for a fixed seeded input batch, the official model's logits (eval mode) and summaries of every map
  of its `is_feat` and `preact` lists and of the pooled feature (shape, sum, sum of squares, 16 values).

The test (`tests/test_cifar_official.py`) imports `synthetic_weights`, `fixture_input` and `summarize`
from this file, so the oracle and the check share one definition of the inputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

INPUT_SHAPE = (2, 3, 32, 32)
INPUT_SEED = 20240
SAMPLES = 16  # values kept per feature map

# arch -> (upstream that defines it in its CIFAR model dict, factory, factory kwargs, zoo model node).
# The RepDistiller nets are also built from mdistiller's copy and must agree (`cross_checked`).
ARCHS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "resnet8": ("repdistiller", "resnet8", {}, {"name": "resnet8"}),
    "resnet14": ("repdistiller", "resnet14", {}, {"name": "resnet14"}),
    "resnet20": ("repdistiller", "resnet20", {}, {"name": "resnet20"}),
    "resnet32": ("repdistiller", "resnet32", {}, {"name": "resnet32"}),
    "resnet44": ("repdistiller", "resnet44", {}, {"name": "resnet44"}),
    "resnet56": ("repdistiller", "resnet56", {}, {"name": "resnet56"}),
    "resnet110": ("repdistiller", "resnet110", {}, {"name": "resnet110"}),
    "resnet8x4": ("repdistiller", "resnet8x4", {}, {"name": "resnet8x4"}),
    "resnet32x4": ("repdistiller", "resnet32x4", {}, {"name": "resnet32x4"}),
    "ResNet50": ("repdistiller", "ResNet50", {}, {"name": "resnet50_cifar"}),
    "wrn_16_1": ("repdistiller", "wrn_16_1", {}, {"name": "wrn_16_1"}),
    "wrn_16_2": ("repdistiller", "wrn_16_2", {}, {"name": "wrn_16_2"}),
    "wrn_40_1": ("repdistiller", "wrn_40_1", {}, {"name": "wrn_40_1"}),
    "wrn_40_2": ("repdistiller", "wrn_40_2", {}, {"name": "wrn_40_2"}),
    "vgg8": ("repdistiller", "vgg8_bn", {}, {"name": "vgg8"}),
    "vgg11": ("repdistiller", "vgg11_bn", {}, {"name": "vgg11"}),
    "vgg13": ("repdistiller", "vgg13_bn", {}, {"name": "vgg13"}),
    "vgg16": ("repdistiller", "vgg16_bn", {}, {"name": "vgg16"}),
    "vgg19": ("repdistiller", "vgg19_bn", {}, {"name": "vgg19"}),
    "MobileNetV2": ("repdistiller", "mobile_half", {}, {"name": "mobilenetv2_cifar"}),
    "ShuffleV1": ("repdistiller", "ShuffleV1", {}, {"name": "shufflev1"}),
    "ShuffleV2": ("repdistiller", "ShuffleV2", {}, {"name": "shufflev2"}),
    # only in mdistiller's CIFAR model dict
    "ResNet18": ("mdistiller", "ResNet18", {}, {"name": "resnet18_cifar"}),
    # defined in both upstream files, outside their model dicts: the rest of the families' variants
    "ResNet34": ("mdistiller", "ResNet34", {}, {"name": "resnet34_cifar"}),
    "ShuffleV2_0.5": (
        "repdistiller",
        "ShuffleNetV2",
        {"net_size": 0.5},
        {"name": "shufflev2", "net_size": 0.5},
    ),
}

# where each upstream keeps its CIFAR models, and how its forward exposes the feature lists
UPSTREAMS = {
    "repdistiller": {"repo": "HobbitLong/RepDistiller", "folder": "models"},
    "mdistiller": {"repo": "megvii-research/mdistiller", "folder": "mdistiller/models/cifar"},
}
FILES = {  # factory -> defining file (for the record)
    "resnet": ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
               "resnet8x4", "resnet32x4"),
    "resnetv2": ("ResNet18", "ResNet34", "ResNet50"),
    "wrn": ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"),
    "vgg": ("vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"),
    "mobilenetv2": ("mobile_half",),
    "ShuffleNetv1": ("ShuffleV1",),
    "ShuffleNetv2": ("ShuffleV2", "ShuffleNetV2"),
}  # fmt: skip


# ------------------------------------------------------------------ shared with the tests --
def synthetic_weights(
    keys_shapes: Sequence[tuple[str, Sequence[int]]], seed: int, var_scale: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic stand-in weights for a state dict given as (key, shape) pairs in order.

    Values depend only on the key list, the seed and `var_scale`, never on model code, so the oracle
    and the test build identical tensors: convs and linears N(0, 1/fan_in), BN gamma U(0.5, 1), beta
    and running mean N(0, 0.1²), running var U(0.5, 1.5) times the module's `var_scale` entry (the
    calibration that keeps eval-mode activations O(1) through 110 layers, see `calibrate_bn`), other
    biases N(0, 0.1²), BN step counters 0.
    """
    gen = torch.Generator().manual_seed(int(seed))
    var_scale = var_scale or {}
    modules_with_stats = {k.rsplit(".", 1)[0] for k, _ in keys_shapes if k.endswith(".running_mean")}
    out: dict[str, torch.Tensor] = {}
    for key, shape in keys_shapes:
        shape = tuple(int(s) for s in shape)
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            out[key] = (0.5 + torch.rand(shape, generator=gen)) * float(var_scale.get(module, 1.0))
        elif leaf == "running_mean" or (leaf == "bias" and module in modules_with_stats):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif leaf == "weight" and module in modules_with_stats:
            out[key] = 0.5 + 0.5 * torch.rand(shape, generator=gen)
        elif leaf == "weight":
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


def fixture_input(seed: int = INPUT_SEED, shape: Sequence[int] = INPUT_SHAPE) -> torch.Tensor:
    """The seeded input batch every fixture is computed on."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def summarize(t: torch.Tensor) -> dict[str, Any]:
    """Shape, float64 sum and sum of squares, and SAMPLES evenly spaced values of a (B, ...) tensor."""
    flat = t.detach().double().reshape(-1)
    n = flat.numel()
    idx = [round(i * (n - 1) / (SAMPLES - 1)) for i in range(SAMPLES)]
    return {
        "shape": list(t.shape),
        "sum": float(flat.sum()),
        "sumsq": float((flat * flat).sum()),
        "index": idx,
        "values": [float(flat[i]) for i in idx],
    }


# ------------------------------------------------------------------ upstream code --------
def _git_dir(path: Path) -> Path | None:
    for candidate in (path, path / ".git"):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    return None


def read_upstream(path: Path, folder: str, commit: str | None, into: Path) -> str:
    """Copy `folder/*.py` of the upstream at `path` into `into`; return the commit read."""
    into.mkdir(parents=True)
    git = _git_dir(path)
    if git is None:
        if not commit:
            raise SystemExit(f"{path} is not a git checkout: pass its commit with --*-commit")
        for src in (path / folder).glob("*.py"):
            (into / src.name).write_text(src.read_text())
        return commit

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(git), *args], check=True, capture_output=True, text=True
        ).stdout

    commit = run("rev-parse", commit or "HEAD").strip()
    for name in run("ls-tree", "--name-only", f"{commit}:{folder}").split():
        if name.endswith(".py"):
            (into / name).write_text(run("show", f"{commit}:{folder}/{name}"))
    return commit


def import_package(parent: Path, name: str):
    sys.path.insert(0, str(parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(parent))


def official_outputs(model: torch.nn.Module, x: torch.Tensor, upstream: str) -> dict[str, Any]:
    """logits, `is_feat` maps (stem first, pooled feature excluded), `preact` maps, pooled feature."""
    with torch.no_grad():
        if upstream == "repdistiller":
            feats, logits = model(x, is_feat=True, preact=False)
            pre = model(x, is_feat=True, preact=True)
            pre_feats = pre[0]  # ResNet50's preact branch returns [feats, logits] as a list
            return {"logits": logits, "feats": feats[:-1], "preact": pre_feats[:-1], "pooled": feats[-1]}
        logits, feats = model(x)
        return {
            "logits": logits,
            "feats": feats["feats"],
            "preact": feats.get("preact_feats", feats["feats"]),  # mdistiller's MobileNetV2 has none
            "pooled": feats["pooled_feat"],
        }


def calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per-BN scalar: the mean square of the BN's input on `x`, applied to its running var as it runs.

    Random running statistics do not normalise, so activations would vanish (VGG-19) or explode
    (ResNet-110); scaling each BN's variance by its actual input power, in forward order, keeps every
    map O(1) and the logits input-dependent. One scalar per BN keeps the fixture small.
    """
    scales: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):

            def pre_hook(mod, inputs, name=name):
                if name not in scales:  # WRN's preact path calls a BN twice; the first call counts
                    scales[name] = float(inputs[0].double().pow(2).mean())
                    mod.running_var.mul_(scales[name])

            handles.append(module.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return scales


def weights_seed(arch: str) -> int:
    """A per-architecture seed that does not depend on which architectures are generated."""
    return zlib.crc32(arch.encode()) % 100_000


def defining_file(factory: str) -> str:
    return next(f for f, names in FILES.items() if factory in names)


def build_fixture(arch: str, packages: dict[str, Any], commits: dict[str, str], seed: int) -> dict[str, Any]:
    upstream, factory, kwargs, zoo = ARCHS[arch]
    torch.manual_seed(0)
    make: Callable[..., torch.nn.Module] = getattr(packages[upstream], factory, None) or getattr(
        importlib.import_module(f"{packages[upstream].__name__}.{defining_file(factory)}"), factory
    )
    model = make(num_classes=100, **kwargs).eval()
    keys_shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    x = fixture_input()
    model.load_state_dict(synthetic_weights(keys_shapes, seed))
    var_scale = calibrate_bn(model, x)
    model.load_state_dict(synthetic_weights(keys_shapes, seed, var_scale))
    out = official_outputs(model, x, upstream)
    cross = []
    for other, package in packages.items():
        fn = getattr(package, factory, None)
        if other == upstream or fn is None:
            continue
        twin = fn(num_classes=100, **kwargs).eval()
        twin.load_state_dict(synthetic_weights(keys_shapes, seed, var_scale))
        twin_out = official_outputs(twin, x, other)
        if not torch.equal(twin_out["logits"], out["logits"]):
            raise SystemExit(f"{arch}: {other} and {upstream} disagree on the same weights")
        cross.append(other)
    source = UPSTREAMS[upstream]
    return {
        "arch": arch,
        "zoo_model": zoo,
        "upstream": source["repo"],
        "commit": commits[upstream],
        "file": f"{source['folder']}/{defining_file(factory)}.py",
        "factory": factory,
        "factory_kwargs": kwargs,
        "cross_checked": [UPSTREAMS[c]["repo"] for c in cross],
        "num_classes": 100,
        "weights_seed": seed,
        "input": {"shape": list(INPUT_SHAPE), "seed": INPUT_SEED, "sum": float(x.double().sum())},
        "state_dict": [[k, s] for k, s in keys_shapes],
        "bn_var_scale": var_scale,
        "logits": out["logits"].tolist(),
        "is_feat": [summarize(f) for f in out["feats"]],
        "preact": [summarize(f) for f in out["preact"]],
        "pooled": summarize(out["pooled"]),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repdistiller", type=Path, required=True)
    parser.add_argument("--mdistiller", type=Path, required=True)
    parser.add_argument("--repdistiller-commit")
    parser.add_argument("--mdistiller-commit")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/cifar_official"
    )
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), help="subset of architectures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        packages, commits = {}, {}
        for name, path, commit in (
            ("repdistiller", args.repdistiller, args.repdistiller_commit),
            ("mdistiller", args.mdistiller, args.mdistiller_commit),
        ):
            package = f"upstream_{name}"
            commits[name] = read_upstream(path, UPSTREAMS[name]["folder"], commit, Path(tmp) / package)
            packages[name] = import_package(Path(tmp), package)
        args.out.mkdir(parents=True, exist_ok=True)
        for arch in args.arch:
            fixture = build_fixture(arch, packages, commits, seed=weights_seed(arch))
            path = args.out / f"{arch}.json"
            path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
            logits = torch.tensor(fixture["logits"])
            print(
                f"{arch:14s} {fixture['upstream']:28s} |logit| max {logits.abs().max():8.3f} -> {path.name}"
            )


if __name__ == "__main__":
    main()
