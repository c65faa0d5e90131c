"""Write docs/recipes.md: every recipe key with its type, default and meaning, from the schema itself
(``icnn_compress.recipe.Recipe``), so the page cannot drift from the code. ``--check`` exits 1 when
the page is out of date (the test suite runs it).

    .venv/bin/python tools/gen_recipe_docs.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from icnn_compress.recipe import Recipe

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"

HEAD = """# Recipe keys

A recipe is a YAML file of sections; every key is optional and has the default below.
`prune-recipe show RECIPE` prints a recipe with every default filled in; `--set key.sub=value`
overrides one key from the command line (the value is read as YAML: `null`, numbers, lists).
Unknown keys and out-of-range values are refused with one line that names the key, the file line
(or the `--set` option) and what is allowed; `show` also refuses an unknown dataset, model or
criterion name, and `prune-recipe validate RECIPE` checks everything a run would use (layers,
weights file, data sizes) without writing. YAML is read with `safe_load`.

This page is generated from the schema by `tools/gen_recipe_docs.py`; a test fails when it is out
of date.
"""


def _type(annotation) -> str:
    """A short readable type; alternatives separated by an escaped bar (a Markdown table cell)."""
    return _plain_type(annotation).replace(" | ", " \\| ")


def _plain_type(annotation) -> str:
    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_plain_type(a) for a in args)
    if origin is typing.Annotated:
        return _plain_type(args[0])
    if origin is list:
        return f"list[{_plain_type(args[0])}]"
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    for noise in ("Annotated[", "<class '", "'>"):
        text = text.replace(noise, "")
    text = text.replace("NoneType", "null")
    if typing.get_origin(annotation) is typing.Literal:
        text = " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    return text.split(", FieldInfo")[0].split(", Ge(")[0]


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    else:
        value = field.default
    return "" if value is None else f"`{json.dumps(value)}`"


def render() -> str:
    lines = [HEAD]
    top = [(n, f) for n, f in Recipe.model_fields.items() if not _is_section(f)]
    lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {_type(f.annotation)} | {_default(f)} | {f.description or ''} |" for n, f in top]
    for name, field in Recipe.model_fields.items():
        if not _is_section(field):
            continue
        section = field.annotation
        lines += ["", f"## `{name}`", "", (section.__doc__ or "").strip().splitlines()[0], ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, f in section.model_fields.items():
            if _is_section(f):  # a nested section (distill): its keys as key.sub
                for sub, g in f.annotation.model_fields.items():
                    default = (
                        f.default_factory().model_dump(mode="json")[sub] if f.default_factory else g.default
                    )
                    lines.append(
                        f"| `{key}.{sub}` | {_type(g.annotation)} | `{json.dumps(default)}` | "
                        f"{g.description or ''} |"
                    )
                continue
            lines.append(f"| `{key}` | {_type(f.annotation)} | {_default(f)} | {f.description or ''} |")
    return "\n".join(lines) + "\n"


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is out of date")
    a = p.parse_args()
    text = render()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/gen_recipe_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
