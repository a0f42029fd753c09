"""Named, versioned recipe files (TOML data). Loaded with ``accel.recipe.load(name)``."""
