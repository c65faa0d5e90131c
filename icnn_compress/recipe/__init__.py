"""Recipes: the schema, YAML loading with overrides, the run directory, the stages and the runner."""

from icnn_compress.recipe import _stages as stages
from icnn_compress.recipe._context import RunContext, resolve_device
from icnn_compress.recipe._load import RECIPES_DIR, apply_overrides, bundled_recipes, load_recipe, recipe_hash
from icnn_compress.recipe._rundir import MARKER, LockError, RunDirectory
from icnn_compress.recipe._runner import DEPENDS, STAGES, Runner, run_recipe
from icnn_compress.recipe._schema import Recipe

__all__ = [
    "DEPENDS",
    "MARKER",
    "RECIPES_DIR",
    "STAGES",
    "LockError",
    "Recipe",
    "RunContext",
    "RunDirectory",
    "Runner",
    "apply_overrides",
    "bundled_recipes",
    "load_recipe",
    "recipe_hash",
    "resolve_device",
    "run_recipe",
    "stages",
]
