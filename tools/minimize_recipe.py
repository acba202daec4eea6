"""Report, or remove with --write, recipe keys that repeat what their `defaults:` parents give.

    python tools/minimize_recipe.py configs/grpo-7b.yaml            # list redundant keys
    python tools/minimize_recipe.py configs/*.yaml --write          # remove them in place
    python tools/minimize_recipe.py configs/*.yaml --check          # exit 1 if any exist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrl.config.errors import ConfigError  # noqa: E402
from mrl.config.minimize import minimize_recipe  # noqa: E402
from mrl.config.yaml_io import format_scalar  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", metavar="RECIPE")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="remove the redundant keys in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when any recipe has redundant keys")
    args = parser.parse_args(argv)

    found_any = False
    for recipe in args.recipes:
        try:
            result = minimize_recipe(recipe, write=args.write)
        except ConfigError as exc:
            print(f"{recipe}: {exc}", file=sys.stderr)
            return 2
        for item in result.removed:
            found_any = True
            action = "removed" if args.write else "redundant"
            print(f"{recipe}: {action} {item.path} = {format_scalar(item.value)} "
                  f"(already given by {item.source})")
        if args.write and result.removed and not result.comments_kept:
            print(f"{recipe}: rewritten from its data; comments were not kept", file=sys.stderr)
    return 1 if args.check and found_any else 0


if __name__ == "__main__":
    sys.exit(main())
