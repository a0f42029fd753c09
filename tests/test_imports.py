"""Every import inside accel/, kernels/ and eval/ points one way: no module imports one that (through any chain)
imports it back, and no folder (subpackage) does either.

The graph is read from the source (``ast``), so imports inside functions count: a circle hidden in a function
is still a circle. ``import accel`` followed by ``accel.NAME`` counts as an import of the module that ``accel``'s
lazy ``__getattr__`` loads for ``NAME``; importing ``accel.a.b`` also imports the package ``accel.a`` (its
``__init__`` runs first), unless the importer is inside that package already.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"accel": ROOT / "accel", "accel.kernels": ROOT / "kernels", "accel.eval": ROOT / "eval",
           "accel.recipes": ROOT / "recipes"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for p in sorted(folder.rglob("*.py")):
            parts = list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


def _root_exports(mods: dict[str, Path]) -> dict[str, str]:
    """``accel``'s lazy names: ``NAME -> module`` (from ``_EXPORTS`` and ``_SUBMODULES`` in accel/__init__.py)."""
    tree = ast.parse(mods["accel"].read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_EXPORTS":
                names.update({k: f"accel.{v}" for k, v in ast.literal_eval(node.value).items()})
            elif node.targets[0].id == "_SUBMODULES":
                names.update({k: f"accel.{k}" for k in ast.literal_eval(node.value)})
    return names


def imports(name: str, path: Path, mods: dict[str, Path], exports: dict[str, str]) -> set[str]:
    """The accel modules that importing (and running any function of) ``name`` may import."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def add(target: str | None):
        if target is None:
            return
        if target == "accel":
            return  # the lazy root imports nothing by itself: its names are resolved where they are used
        found.add(target)
        parts = target.split(".")
        for i in range(2, len(parts)):  # the packages above the target run their __init__ first
            parent = ".".join(parts[:i])
            if not (name == parent or name.startswith(parent + ".")):
                found.add(parent)

    uses_root = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "accel" or alias.name.startswith("accel."):
                    uses_root |= alias.name == "accel" and alias.asname is None
                    add(owner(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == "accel" or mod.startswith("accel.")):
                continue
            for alias in node.names:
                if f"{mod}.{alias.name}" in mods:
                    add(f"{mod}.{alias.name}")
                elif mod == "accel" and alias.name in exports:
                    add(exports[alias.name])
                else:
                    add(owner(mod))
    if uses_root:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "accel":
                add(exports.get(node.attr))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    exports = _root_exports(mods)
    return {name: imports(name, path, mods, exports) for name, path in mods.items()}


def folder(name: str) -> str:
    """The node of ``name`` in the folder graph: its subpackage (``accel.transforms``), or the module itself
    for a module directly in accel/."""
    return ".".join(name.split(".")[:2])


def folder_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in g.items():
        out[folder(a)]
        for b in targets:
            if folder(a) != folder(b):
                out[folder(a)].add(folder(b))
    return dict(out)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _path(g, comp):
    """One concrete circle through a component, for the failure message."""
    start = comp[0]
    seen, todo = {start: None}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(g.get(v, ())):
            if w == start:
                chain = [v]
                while seen[chain[-1]] is not None:
                    chain.append(seen[chain[-1]])
                return " -> ".join(reversed(chain)) + f" -> {start}"
            if w in comp and w not in seen:
                seen[w] = v
                todo.append(w)
    return ", ".join(comp)


def test_the_walker_sees_imports_and_circles(tmp_path):
    """The walker itself, on a small made-up package: an import inside a function, a name of ``accel``'s lazy root
    used as an attribute, a relative import, a package ``__init__`` run by importing its submodule; and a circle
    it must report."""
    src = {"accel.a": "import accel\n\ndef f():\n    from .b import g\n    return accel.apply\n",
           "accel.b": "from accel.p.q import x\n", "accel.p": "", "accel.p.q": "from . import r\n",
           "accel.p.r": "", "accel.api": ""}
    mods = {}
    for name, text in src.items():
        mods[name] = tmp_path / f"{name}.py"
        mods[name].write_text(text)
    exports = {"apply": "accel.api"}
    assert imports("accel.a", mods["accel.a"], mods, exports) == {"accel.b", "accel.api"}
    assert imports("accel.b", mods["accel.b"], mods, exports) == {"accel.p", "accel.p.q"}
    assert imports("accel.p.q", mods["accel.p.q"], mods, exports) == {"accel.p.r"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert folder_graph({"accel.p.q": {"accel.b"}, "accel.b": {"accel.p"}}) == {"accel.p": {"accel.b"},
                                                                                 "accel.b": {"accel.p"}}
    g = graph()  # and on the real tree: edges that exist today
    assert "accel.hooks" in g["accel.transforms.compose"] and "accel.kernels" in g["accel.transforms.quantize"]
    assert "accel.api" in g["accel.miniature.train"]  # an import inside a function


def test_no_module_import_cycle():
    g = graph()
    found = cycles(g)
    assert not found, "import cycles between modules:\n" + "\n".join(_path(g, c) for c in found)


def test_no_folder_import_cycle():
    g = folder_graph(graph())
    found = cycles(g)
    assert not found, "import cycles between folders:\n" + "\n".join(_path(g, c) for c in found)


def test_no_dynamic_imports_of_accel_modules():
    """``sys.modules[...]`` and ``importlib.import_module`` would hide edges from the walker: only accel's lazy
    root may use them."""
    offenders = []
    for name, path in modules().items():
        if name == "accel":
            continue
        text = path.read_text()
        for needle in ("sys.modules[", "import_module(", "__import__("):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders


# The layers, bottom to top (README "Architecture"): a module imports only from its own layer or below.
LAYERS = [
    {"accel.errors", "accel.fileio", "accel.hooks", "accel.timing", "accel.schedules", "accel.unet", "accel.dist",
     "accel.adapters", "accel.kernels", "accel.recipes"},
    {"accel.transforms", "accel.recipe"},
    {"accel.calibration"},
    {"accel.api"},
    {"accel.miniature"},
    {"accel.calibrate", "accel.eval"},
    {"accel.cli", "accel.bench", "accel.experiments", "accel.__main__"},
]


def _layer(name: str) -> int | None:
    node = folder(name)
    for i, layer in enumerate(LAYERS):
        if node in layer:
            return i
    return None


def test_imports_point_down_the_layers():
    """No module imports from a layer above its own (a transform never imports the API, the calibration or the
    benches; the miniature world never imports eval); and every module is in a layer."""
    g = graph()
    unplaced = sorted(n for n in g if n != "accel" and _layer(n) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and the README's Architecture): {unplaced}"
    upward = [f"{a} -> {b}" for a, ts in sorted(g.items()) if a != "accel" for b in sorted(ts)
              if _layer(b) is not None and _layer(b) > _layer(a)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_kernels_folder_is_only_accel_kernels():
    """kernels/ is imported as ``accel.kernels`` only: transformers' probe for the hub's ``kernels`` package finds
    no top-level ``kernels`` in this checkout (conftest keeps the root off sys.path; a second copy would register the
    custom ops again, over accel.kernels')."""
    import sys

    import transformers.utils.import_utils as iu

    import accel.kernels

    iu.is_kernels_available()
    top = sys.modules.get("kernels")
    assert top is None or getattr(top, "__file__", None) != accel.kernels.__file__
