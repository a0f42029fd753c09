"""Recipes: named, versioned TOML files saying which transforms to apply with which parameters.

    name = "deepcache-i3"
    version = 1
    description = "DeepCache at interval 3, branch 0"

    [[transform]]
    type = "FeatureCache"
    interval = 3
    branch = 0

``load("deepcache-i3")`` finds ``recipes/deepcache-i3.toml`` (shipped as ``accel.recipes``); a path to a
``.toml`` file works too. Unknown keys, types or parameters are errors that name what is allowed.

A recipe is the transforms' own serialization (their ``to_dict`` / ``from_dict``), so it sits beside them, below
``accel.api`` and the calibration; ``accel.recipe`` is the public name.
"""
from __future__ import annotations

import importlib.resources
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError
from .base import Transform

FORMAT_VERSION = 1
_TOP_KEYS = {"name", "version", "description", "transform"}


def recipes_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("accel.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "recipes"


def available() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


@dataclass
class Recipe:
    name: str
    transforms: list[Transform]
    version: int = FORMAT_VERSION
    description: str = ""

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"', f"version = {self.version}"]
        if self.description:
            lines.append(f"description = {_toml_value(self.description)}")
        for t in self.transforms:
            lines.append("\n[[transform]]")
            for k, v in t.to_dict().items():
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike):
        from ..fileio import write_text_atomic

        write_text_atomic(path, self.to_toml())


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise RecipeError(f"cannot write {v!r} to a recipe")


def parse(text: str, source: str = "<recipe>") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise RecipeError(f"{source}: recipe format version {version}; this accel reads version {FORMAT_VERSION}")
    items = data.get("transform")
    if not isinstance(items, list) or not items or not all(isinstance(t, dict) for t in items):
        raise RecipeError(f"{source}: needs at least one [[transform]] table")
    try:
        transforms = [Transform.from_dict(t) for t in items]
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return Recipe(name=data.get("name", Path(source).stem), transforms=transforms, version=version,
                  description=data.get("description", ""))


def load(name_or_path: str | os.PathLike) -> Recipe:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return parse(p.read_text(), str(p))
    candidate = recipes_dir() / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available())} "
                          "(or give a path to a .toml file)")
    return parse(candidate.read_text(), str(candidate))
