"""Recipe loading: YAML (safe_load), ``--set key.sub=value`` overrides, errors people can act on."""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from icnn_compress.errors import ConfigError
from icnn_compress.recipe._schema import Recipe

__all__ = ["RECIPES_DIR", "apply_overrides", "bundled_recipes", "load_recipe", "recipe_hash"]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data (recipes/ links here)


def bundled_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped with the package (``icnn_compress/recipes``; the
    repository's top-level ``recipes/`` is a link to it)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))} if RECIPES_DIR.is_dir() else {}


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything larger is not one
MAX_RECIPE_VALUES = 100_000  # values after YAML aliases are expanded (stops "billion laughs")


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES}).")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.start}): a recipe is YAML text."
        ) from None


def _check_size(node, name: str) -> None:
    """Refuse a YAML document whose aliases expand to more than ``MAX_RECIPE_VALUES`` values,
    counted on the node graph without expanding it."""
    sizes: dict[int, int] = {}

    def size(n) -> int:
        if n is None:
            return 0
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a recursive alias counts once (safe_load refuses it later anyway)
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        sizes[id(n)] = min(total, MAX_RECIPE_VALUES + 1)
        return sizes[id(n)]

    if size(node) > MAX_RECIPE_VALUES:
        raise ConfigError(
            f"{name}: the recipe expands to more than {MAX_RECIPE_VALUES} values (YAML aliases); "
            "recipes are small mappings of sections."
        )


def _lines(text: str) -> dict[tuple, int]:
    """Key path -> 1-based line of the key in the YAML text (best effort)."""
    out: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)

    with contextlib.suppress(yaml.YAMLError):
        walk(yaml.compose(text), ())
    return out


def _fields(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the sub-config at ``path`` (for suggestions)."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


_UNION_TAGS = ("literal[", "list[", "dict[", "tuple[", "function-")


def _is_union_tag(part) -> bool:
    """Whether a location part names a member of a union type (pydantic adds one per member)."""
    part = str(part)
    return part in ("bool", "int", "float", "str", "none") or part.startswith(_UNION_TAGS)


def _first_error(err: ValidationError) -> dict:
    """The first error, its location without union-member tags; for a value that matched no
    member of a union type (``"auto" | bool``), one message naming every member's rule."""
    errors = err.errors()
    e = dict(errors[0])
    loc = tuple(p for p in e["loc"] if not _is_union_tag(p))
    if len(loc) < len(e["loc"]):
        msgs = []
        for other in errors:
            if tuple(p for p in other["loc"] if not _is_union_tag(p)) == loc and other["msg"] not in msgs:
                msgs.append(other["msg"])
        e["msg"] = ", or ".join([msgs[0], *(m[:1].lower() + m[1:] for m in msgs[1:])])
    e["loc"] = loc
    return e


def _format(err: ValidationError, lines: dict[tuple, int], source: str, overridden: set[tuple]) -> str:
    e = _first_error(err)
    loc = tuple(str(p) for p in e["loc"])
    key = ".".join(loc)
    line = lines.get(loc) or lines.get(loc[:-1])
    culprits = [o for o in overridden if loc[: len(o)] == o or o[: len(loc)] == loc]
    # the bad value, or a section that a --set changed, came from the command line
    named = ", ".join(".".join(o) for o in sorted(culprits))
    where = f"--set {named}: " if culprits else (f"{source}:{line}: " if line else f"{source}: ")
    if e["type"] == "extra_forbidden":
        allowed = _fields(Recipe, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" Did you mean {'.'.join((*loc[:-1], close[0]))!r}?" if close else ""
        return f"{where}unknown key {key!r}.{hint} Allowed here: {', '.join(allowed)}."
    if named == key:  # "--set a.b: <message>", not "--set a.b: a.b: <message>"
        got = e.get("input")
        got_s = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None), list)) else ""
        return f"--set {key}: {e['msg']}" + (f" (got {got_s})." if got_s else ".")
    got = e.get("input")
    if isinstance(got, dict):  # a whole section: its message says what is wrong
        return f"{where}{key}: {e['msg'].removeprefix('Value error, ')}."
    got_s = (
        json.dumps(got) if isinstance(got, (str, int, float, bool, type(None), list)) else type(got).__name__
    )
    return f"{where}{key}: {e['msg']} (got {got_s})."


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a recipe dict."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set needs key.sub=value. Got {item!r}.")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set needs a key before '='. Got {item!r}.")
        try:
            _check_size(yaml.compose(raw), f"--set {key}")
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {problem}.") from None
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section.")
            node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])!r} is not a section.")
        node[parts[-1]] = value
    return data


def load_recipe(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe: a path, a bundled recipe name (``quickstart``) or a dict.

    Raises ``ConfigError`` with one line naming the file, line, key path, bad value and what is
    allowed, for YAML syntax errors, unknown keys (with a suggestion) and invalid values.
    """
    text, name = "", "<recipe>"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists() and str(source) in bundled_recipes():
            path = bundled_recipes()[str(source)]
        if not path.is_file():
            known = ", ".join(bundled_recipes()) or "none"
            raise ConfigError(f"Recipe {str(source)!r} is not a file or a bundled recipe (bundled: {known}).")
        name = str(path)
        text = _read_text(path)
        try:
            _check_size(yaml.compose(text), name)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error: {problem}.") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: a recipe must be a mapping of sections. Got {type(data).__name__}.")
    data = apply_overrides(data, overrides or [])
    overridden = {tuple(p for p in item.split("=", 1)[0].strip().split(".") if p) for item in overrides or []}
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, _lines(text), name, overridden)) from None


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 of the resolved recipe (stable key order)."""
    return hashlib.sha256(json.dumps(recipe.model_dump(), sort_keys=True).encode()).hexdigest()
