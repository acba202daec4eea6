"""Render the Markdown config reference of a config schema, or keep a document's copy of it current.

    python tools/config_reference.py mrl.model.config:ModelConfig            # print it
    python tools/config_reference.py SCHEMA --update README.md               # rewrite the marked block
    python tools/config_reference.py SCHEMA --check README.md                # exit 1 when out of date

In a document the generated text sits between two marker lines::

    <!-- config-reference: mrl.model.config:ModelConfig -->
    ...generated...
    <!-- /config-reference -->
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrl.config.docs import render_reference  # noqa: E402

END_MARKER = "<!-- /config-reference -->"


def begin_marker(spec: str) -> str:
    return f"<!-- config-reference: {spec} -->"


def load_schema(spec: str) -> type:
    """``'package.module:Class'`` → the class."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise SystemExit(f"schema must be given as module:Class, got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise SystemExit(f"module {module_name} has no class {class_name!r}") from None


def _block_pattern(spec: str) -> re.Pattern:
    return re.compile(rf"({re.escape(begin_marker(spec))}\n)(.*?)(^{re.escape(END_MARKER)})",
                      re.DOTALL | re.MULTILINE)


def update_text(text: str, spec: str, reference: str) -> str:
    """``text`` with every block marked for ``spec`` replaced by ``reference``."""
    return _block_pattern(spec).sub(lambda m: f"{m.group(1)}\n{reference}\n{m.group(3)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("schema", help="the config dataclass as module:Class")
    parser.add_argument("--heading-level", type=int, default=3, help="Markdown level of section headings")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", metavar="FILE", help="exit 1 if FILE's marked block is out of date")
    mode.add_argument("--update", metavar="FILE", help="rewrite FILE's marked block")
    args = parser.parse_args(argv)

    reference = render_reference(load_schema(args.schema), heading_level=args.heading_level)
    target = args.check or args.update
    if target is None:
        sys.stdout.write(reference)
        return 0
    path = Path(target)
    text = path.read_text(encoding="utf-8")
    if not _block_pattern(args.schema).search(text):
        print(f"{path}: no block between '{begin_marker(args.schema)}' and '{END_MARKER}'",
              file=sys.stderr)
        return 2
    new_text = update_text(text, args.schema, reference)
    if args.update:
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            print(f"{path}: config reference updated")
        return 0
    if new_text == text:
        return 0
    diff = difflib.unified_diff(text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                fromfile=f"{path} (current)", tofile=f"{path} (generated)")
    sys.stderr.writelines(diff)
    print(f"{path}: the config reference for {args.schema} is out of date; run\n"
          f"  python tools/config_reference.py {args.schema} --update {path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
