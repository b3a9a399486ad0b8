"""The package order (docs: DESIGN.md): imports inside ctseg/ go down this list, never up.

    cli -> study -> train -> infer -> evaluate -> data -> transforms -> slices -> io / networks / config /
    distributed / geometry / body -> outputs -> utils / pretrained -> errors / the package root

Every import is read with `ast`, at module level and inside functions, so an upward edge cannot
hide in a function body. Packages in the same layer (io, networks, config, distributed, body) do not
import each other. An import of ctseg inside a function must say why on its line (a comment, e.g.
`# lazy: heavy`), and still goes down.

Also: the environment is read only at the edge (cli.py; distributed.py for torchrun), and no
call site states its own default for a setting (the schema holds them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctseg"

#: Top-level part of a module name (after `ctseg.`) -> layer; a lower number sits higher.
LAYERS = {
    "cli": 0,
    "study": 1,
    "train": 2,
    "infer": 3,
    "evaluate": 4,
    "data": 5,
    "transforms": 6,
    "slices": 6.5,  # what the network sees, MONAI-free: transforms (training) and infer both read it
    "io": 7, "networks": 7, "config": 7, "distributed": 7, "geometry": 7, "body": 7,
    "outputs": 8,  # which files a command may replace (io and the stages above write through it)
    "utils": 9, "pretrained": 9,  # pretrained: where the packaged weights and their card live (paths only)
    "errors": 10, "": 10,  # "": the package root (`ctseg.__version__`)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top(module: str) -> str:
    """`ctseg.infer.cases` -> "infer"; `ctseg` -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The ctseg modules `node` imports (relative imports resolved against `importer`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "ctseg"]
    base = node.module or ""
    if node.level:
        package = importer.split(".")
        if not is_package:
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if base.split(".")[0] != "ctseg":
        return []
    if base == "ctseg":  # `from ctseg import x`: x is a subpackage or a name of the root
        return [f"ctseg.{a.name}" if a.name in LAYERS else "ctseg" for a in node.names]
    return [base]


class Edge:
    def __init__(self, path: Path, line: int, importer: str, imported: str, in_function: bool,
                 commented: bool) -> None:
        self.path, self.line, self.importer, self.imported = path, line, importer, imported
        self.in_function, self.commented = in_function, commented

    def __str__(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}: {self.importer} -> {self.imported}"


def edges_in(source: str, path: Path) -> list[Edge]:
    """Every ctseg import in `source`, read as the module at `path` inside the package."""
    lines = source.splitlines()
    importer = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                commented = any("#" in text for text in lines[child.lineno - 1: child.end_lineno])
                for imported in imported_modules(child, importer, is_package):
                    found.append(Edge(path, child.lineno, importer, imported, in_function, commented))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(source, filename=str(path)), False)
    return found


def all_edges() -> list[Edge]:
    return [e for path in sorted(PACKAGE.rglob("*.py")) for e in edges_in(path.read_text(encoding="utf-8"), path)]


def upward(edge: Edge) -> bool:
    source, target = top(edge.importer), top(edge.imported)
    if source == "cli" or source == target:
        return False
    if source not in LAYERS or target not in LAYERS:
        return True  # a new top-level module must be given a layer first
    if LAYERS[target] == LAYERS[source]:
        return True  # siblings (io, networks, config, distributed) stay independent
    return LAYERS[target] < LAYERS[source]


def test_every_top_level_module_has_a_layer() -> None:
    names = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert names - set(LAYERS) == set(), "give these modules a layer in LAYERS (and DESIGN.md)"


def test_imports_only_go_down() -> None:
    bad = [str(e) for e in all_edges() if upward(e)]
    assert not bad, "upward imports (see the order in this file's docstring):\n" + "\n".join(bad)


def test_imports_inside_functions_say_why() -> None:
    hidden = [str(e) for e in all_edges()
              if e.in_function and not e.commented and top(e.importer) != "cli"]
    assert not hidden, ("imports of ctseg inside functions hide edges; move them to the top of the "
                        "module or say why on the line (# lazy: ...):\n" + "\n".join(hidden))


# --------------------------------------------------------------------------- the checker itself
@pytest.mark.parametrize(("code", "importer", "expected_up"), [
    ("from ctseg.train.loop import train", "ctseg.infer.cases", True),
    ("import ctseg.study.cv", "ctseg.evaluate.metrics", True),
    ("from ..train import checkpoint", "ctseg.infer.model_loader", True),
    ("from ctseg.networks import build_network", "ctseg.config.schema", True),  # siblings
    ("from ctseg.infer.volume import predict_volume", "ctseg.train.loop", False),
    ("from . import figures", "ctseg.evaluate.report", False),
    ("from ctseg import __version__", "ctseg.io.dicom_seg", False),
    ("from ctseg.study.cv import run_cv", "ctseg.cli", False),
])
def test_checker_flags_upward_edges(code: str, importer: str, expected_up: bool) -> None:
    path = PACKAGE.parent / Path(*importer.split(".")).with_suffix(".py")
    tree = ast.parse(code)
    node = tree.body[0]
    assert isinstance(node, (ast.Import, ast.ImportFrom))
    targets = imported_modules(node, importer, False)
    assert targets
    verdicts = {upward(Edge(path, 1, importer, t, False, False)) for t in targets}
    assert verdicts == {expected_up}


def test_checker_sees_imports_inside_functions() -> None:
    path = PACKAGE / "evaluate" / "example.py"  # read as if it were there; nothing is written
    source = ("from ctseg.io import load_mask\n"
              "def f():\n    from ctseg.train import train  # lazy: heavy\n"
              "def g():\n    if True:\n        from ctseg.data import (\n            discover_cases)\n")
    found = [(e.line, e.imported, e.in_function, e.commented, upward(e)) for e in edges_in(source, path)]
    assert found == [(1, "ctseg.io", False, False, False), (3, "ctseg.train", True, True, True),
                     (6, "ctseg.data", True, False, False)]


# ------------------------------------------------------------------ the environment, at the edge
#: Modules that may touch `os.environ`, and why. Everywhere else the library takes values: the CLI
#: reads CTSEG_CACHE_DIR and MLFLOW_TRACKING_URI and passes them down as settings.
ENVIRONMENT_READERS = {
    "cli.py": "the edge: reads the environment and passes values down",
    "distributed.py": "torchrun's protocol: RANK, LOCAL_RANK and WORLD_SIZE come only through it",
}
#: Modules that may only *set* a variable another library reads from the environment alone.
ENVIRONMENT_WRITERS = {
    "train/tracking.py": "MLflow reads its HTTP retry and timeout limits only from the environment",
}


def environment_uses(source: str) -> list[tuple[int, str]]:
    """(line, how) of every `os.environ...` / `getenv` in `source`; how: the attribute called on
    os.environ (`get`, `setdefault`, ...), "[]" for a subscript, "" for a bare use."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in ("getenv", "getenvb", "environb"):
            found.append((node.lineno, name))
        elif name == "environ":
            parent = parents.get(node)
            how = (parent.attr if isinstance(parent, ast.Attribute) else
                   "[]" if isinstance(parent, ast.Subscript) else "")
            found.append((node.lineno, how))
    return sorted(found)


def test_environment_is_read_only_at_the_edge() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in ENVIRONMENT_READERS:
            continue
        for line, how in environment_uses(path.read_text(encoding="utf-8")):
            if not (name in ENVIRONMENT_WRITERS and how == "setdefault"):
                offenders.append(f"ctseg/{name}:{line}: os.environ{'.' + how if how not in ('', '[]') else how}")
    assert not offenders, "environment read below the CLI (pass the value down instead):\n" + "\n".join(offenders)


def test_environment_checker_sees_every_form() -> None:
    source = ("import os\nfrom os import environ, getenv\na = os.environ.get('X')\nb = os.getenv('Y')\n"
              "c = os.environ['Z']\nd = environ.get('W')\nos.environ.setdefault('V', '1')\n")
    assert environment_uses(source) == [(3, "get"), (4, "getenv"), (5, "[]"), (6, "get"), (7, "setdefault")]


# ------------------------------------------------------------------ settings: defaults in the schema only
def default_lookups(source: str) -> list[int]:
    """Lines calling the raw config lookup `get(config, "a.b", default)` with a default."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get"
            and len(node.args) + len(node.keywords) > 2]


def test_no_inline_setting_defaults() -> None:
    """Defaults live in the schema (`config_view`); a call site with its own default would drift."""
    offenders = [f"ctseg/{path.relative_to(PACKAGE).as_posix()}:{line}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for line in default_lookups(path.read_text(encoding="utf-8"))]
    assert not offenders, "read settings through config_view instead:\n" + "\n".join(offenders)
    assert default_lookups('get(config, "train.epochs", 50)\nget(config, "x")\nd.get("k", 1)\n') == [1]
