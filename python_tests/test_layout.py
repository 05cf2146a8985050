"""The package's import graph: no cycles among safron's modules, and the command-line package on top of it all.

Every `import` counts, at module level and inside functions alike (a function-level import is a dependency all the
same; deferring it only hides a cycle). The one exception is the body of `if __name__ == "__main__":`, which runs only
when a module is executed as a script (`python -m safron.train` delegating to safron.cli.train). An import names its
module: `from safron.x import y` depends on safron.x.y when that is a module, else on safron.x; a parent package's
`__init__` run by Python before a submodule is not an edge of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "safron"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


COMPILED = ("safron._core",)  # built by CMake into the installation, not a file here; it imports nothing of ours


def _modules() -> dict[str, Path | None]:
    modules: dict[str, Path | None] = {
        _module_name(path): path for path in PACKAGE_ROOT.rglob("*.py") if "default_model" not in path.parts
    }
    return {**modules, **dict.fromkeys(COMPILED)}


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(name: str, path: Path, modules: dict[str, Path | None]) -> set[str]:
    """The safron modules that the module `name` (its file at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "safron" or alias.name.startswith("safron."):
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "safron" or source.startswith("safron."):
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    found.add(submodule if submodule in modules else resolve(source))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) if path else set() for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_sees_the_packages_modules_and_their_imports():
    graph = import_graph()
    assert {"safron.engine", "safron.cli.common", "safron.cli.render", "safron.backends.torch_backend"} <= set(graph)
    assert "safron.engine" in graph["safron.cli.render"]  # a function-level import
    assert "safron.errors" in graph["safron.cli.common"]


def test_no_import_cycles_among_safrons_modules():
    assert _cycles(import_graph()) == []


def test_the_mask_classes_are_a_leaf():
    """Class constants, colours and the model's input encoding import nothing of safron's, so the synthetic mask
    generator, the engine and training take them without the mask readers (the masks <-> synthesis cycle)."""
    assert import_graph()["safron.masks.classes"] == set()


def test_no_module_outside_the_cli_package_imports_it():
    importers = {name: sorted(t for t in targets if t == "safron.cli" or t.startswith("safron.cli."))
                 for name, targets in import_graph().items()
                 if not (name == "safron.cli" or name.startswith("safron.cli."))}
    assert {name: targets for name, targets in importers.items() if targets} == {}


def test_inference_does_not_import_export():
    """Rendering reads checkpoints (safron.checkpoints) but never needs the ONNX exporter."""
    graph = import_graph()
    inference = ["safron.engine"] + [name for name in graph if name.startswith("safron.backends")]
    assert {name: "safron.export" in graph[name] for name in inference} == dict.fromkeys(inference, False)


def _assigned_and_called(path: Path) -> tuple[set[str], set[str]]:
    """Names assigned at module level, and dotted names called anywhere, in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    targets = [target for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    assigned = {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return assigned, called


def test_one_definition_each_of_the_blends_the_overlap_and_the_atomic_rename():
    where: dict[str, set[str]] = {"BLENDS": set(), "OVERLAP": set(), "os.replace": set()}
    for name, path in _modules().items():
        if path is None:
            continue
        assigned, called = _assigned_and_called(path)
        where["BLENDS"] |= {name} if "BLENDS" in assigned else set()
        where["OVERLAP"] |= {name} if {"OVERLAP", "DEFAULT_OVERLAP"} & assigned else set()
        where["os.replace"] |= {name} if "os.replace" in called else set()
    # engine.DEFAULT_OVERLAP is geometry.OVERLAP under the engine's name; the pyramidal TIFF writer renames its own
    # resumable .partial file, which files.written_atomically's temporary names are not.
    assert where == {"BLENDS": {"safron.geometry"}, "OVERLAP": {"safron.geometry", "safron.engine"},
                     "os.replace": {"safron.files", "safron.pyramid_tiff"}}


def test_one_raw_image_file_class():
    """The render's canvas and the pyramid writer's level files are one class, `raw_image.RawImageFile`, a leaf: the
    block reads, the disk reservation and the memory-mapped windows live there and nowhere else."""
    where: dict[str, set[str]] = {"os.preadv": set(), "os.posix_fallocate": set(), "np.memmap": set()}
    for name, path in _modules().items():
        if path is not None and name != "safron.slide_io":  # slide_io maps the mask's TIFF pages, not a raw image
            called = _assigned_and_called(path)[1]
            for call in where:
                where[call] |= {name} if call in called else set()
    assert where == dict.fromkeys(where, {"safron.raw_image"})
    assert import_graph()["safron.raw_image"] == set()
