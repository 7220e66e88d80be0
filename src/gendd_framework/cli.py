"""Console entry points: `gendd-train` (Hydra app) and `gendd-list` (what is registered)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import timm


def config_dir() -> Path:
    """The project's top-level `conf/` (editable install) or the packaged copy."""
    for candidate in (Path(__file__).resolve().parents[2] / "conf", Path(__file__).resolve().parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError("gendd-framework configs not found (expected conf/train.yaml)")


def train_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from gendd_framework.errors import ConfigError

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def _train(cfg: DictConfig) -> float | None:
        from gendd_framework.pipeline import run

        run_dir = HydraConfig.get().runtime.output_dir
        try:
            summary = run(cfg, run_dir)
        except ConfigError as exc:
            print(f"gendd-train: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(format_summary(summary))
        return summary.get("objective")

    _train()


def format_summary(summary: dict) -> str:
    lines = [f"run dir: {summary['run_dir']}  ({summary['elapsed_s']} s, {summary['device']})"]
    for stage, record in summary.items():
        if isinstance(record, dict) and "test" in record:
            accs = ", ".join(f"{k[4:]} {v:.2f}%" for k, v in record["test"].items() if k.startswith("acc/"))
            lines.append(f"  {stage:>10} test accuracy: {accs}")
    return "\n".join(lines)


def list_main(argv: list[str] | None = None) -> None:
    """`gendd-list [KIND] [PATTERN]`: names, signatures and one-line docs of registered components."""
    import argparse

    from gendd_framework.plugins import load_plugins
    from gendd_framework.registry import ALL, one_line_doc, signature_text

    parser = argparse.ArgumentParser(prog="gendd-list", description=list_main.__doc__)
    parser.add_argument("kind", nargs="?", help=f"one of: {', '.join(ALL)} (plural works too)")
    parser.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    parser.add_argument("--plugins", nargs="*", default=[], help="extra plugin modules or files to import")
    args = parser.parse_args(argv)
    load_plugins(args.plugins)
    if args.kind is None:
        for kind, reg in ALL.items():
            print(
                f"{kind:<10} {len(reg.names()):>4}  {', '.join(reg.names()[:6])}"
                + (" ..." if len(reg.names()) > 6 else "")
            )
        return
    kind = next((k for k in (args.kind, args.kind[:-1], args.kind[:-2]) if k in ALL), args.kind)
    if kind not in ALL:
        print(f"gendd-list: unknown kind '{args.kind}'; kinds: {', '.join(ALL)}", file=sys.stderr)
        raise SystemExit(2)
    reg = ALL[kind]
    for name in reg.names(args.pattern):
        obj = reg.get(name)
        aliases = reg.aliases_of(name)
        print(f"{name}{signature_text(obj)}" + (f"  [aliases: {', '.join(aliases)}]" if aliases else ""))
        doc = one_line_doc(obj)
        if doc:
            print(f"    {doc}")
    for prefix, doc in reg.prefixes().items():
        print(f"{prefix}:<name>    {doc}")
