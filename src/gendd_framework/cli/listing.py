"""`gendd-list [KIND] [PATTERN]`: what is registered, with signatures and one-line docs."""

from __future__ import annotations

import sys

from gendd_framework.cli.train import EXIT_CONFIG, EXIT_ERROR


def list_main(argv: list[str] | None = None) -> None:
    """`gendd-list [KIND] [PATTERN]`: names, signatures and one-line docs of registered components."""
    import argparse

    from gendd_framework.errors import ConfigError
    from gendd_framework.plugins import load_plugins, plugin_traceback
    from gendd_framework.registry import ALL, one_line_doc, signature_text

    parser = argparse.ArgumentParser(prog="gendd-list", description=list_main.__doc__)
    parser.add_argument("kind", nargs="?", help=f"one of: {', '.join(ALL)} (plural works too)")
    parser.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    parser.add_argument("--plugins", nargs="*", default=[], help="extra plugin modules or files to import")
    args = parser.parse_args(argv)
    try:
        load_plugins(args.plugins)
    except ConfigError as exc:
        print(f"gendd-list: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except Exception as exc:  # a plugin that fails to import: its own frames, not ours
        where = plugin_traceback(exc)
        if where is None:
            raise
        print(f"gendd-list: error in plugin code ({where[0]}):\n{where[1]}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
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
