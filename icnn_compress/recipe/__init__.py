"""Recipes: the schema, YAML loading with overrides, and the stage runner."""

from icnn_compress.recipe._load import RECIPES_DIR, apply_overrides, bundled_recipes, load_recipe, recipe_hash
from icnn_compress.recipe._runner import STAGES, LockError, RunLock, Runner, run_recipe
from icnn_compress.recipe._schema import Recipe

__all__ = [
    "RECIPES_DIR",
    "STAGES",
    "LockError",
    "Recipe",
    "RunLock",
    "Runner",
    "apply_overrides",
    "bundled_recipes",
    "load_recipe",
    "recipe_hash",
    "run_recipe",
]
