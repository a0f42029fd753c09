"""Recipes: named, versioned TOML files saying which transforms to apply (:mod:`accel.transforms.recipe`)."""
from .transforms.recipe import FORMAT_VERSION, Recipe, available, load, parse, recipes_dir

__all__ = ["Recipe", "load", "parse", "available", "recipes_dir", "FORMAT_VERSION"]
