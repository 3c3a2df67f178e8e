"""The package's structure: layers in one direction, one home per concept, a light ``import transferkit``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``module`` imports anywhere (also inside functions), by their full names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != "transferkit":  # the root only re-exports, lazily
                found.add(name)
    return found


def test_imports_go_one_way_no_cycles_and_nothing_imports_the_cli():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cli = {m for m in modules if m.startswith("transferkit.cli") or m == "transferkit.__main__"}
    upward = sorted(
        f"{m} imports {sorted(graph[m] & cli)}" for m in modules if m not in cli and graph[m] & cli
    )
    assert not upward, upward
    # a cycle exists iff a depth-first search meets a module that is still on its path
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert len(modules) > 40  # the scan saw the package


# the packages bottom to top; a package imports only those below it (the foundation modules: anyone)
LAYERS = [
    {"errors", "files", "containers", "settings", "runtime", "lightning_internals", "_lazy"},
    {"data"},
    {"finetuning"},  # mechanics the model uses: groups, the freeze schedule, trunks, optimizers, resizing
    {"models"},
    {"inference"},
    {"reporting"},
    {"training"},
    {"diagnostics", "tuning", "serving"},  # tools that drive a model, data and a Trainer; the HTTP service
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    package = module.split(".")[1] if "." in module else module
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_packages_import_only_the_layers_below_them_function_bodies_included():
    modules = {m: p for m, p in _modules().items() if m != "transferkit"}  # the root re-exports, lazily
    upward = sorted(
        f"{module} imports {target}"
        for module, path in modules.items()
        for target in _imports(module, path, modules)
        if target != "transferkit" and _layer(target) > _layer(module)
    )
    assert not upward, upward
    # the layers name every package there is, so a new one must be placed
    packages = {m.split(".")[1] for m in modules}
    assert packages == set().union(*LAYERS)
    # and within a layer, packages do not import each other (no cycle between peers)
    sideways = sorted(
        f"{module} imports {target}"
        for module, path in modules.items()
        for target in _imports(module, path, modules)
        if target.split(".")[1] != module.split(".")[1]
        and _layer(target) == _layer(module)
        and 0 < _layer(module) < len(LAYERS) - 1  # the foundation and the entry points may
    )
    assert not sideways, sideways


def test_import_transferkit_loads_neither_torch_lightning_matplotlib_nor_the_cli():
    code = (
        "import sys, transferkit as tk\n"
        "heavy = [m for m in ('torch', 'lightning', 'matplotlib', 'transferkit.cli') if m in sys.modules]\n"
        "print(heavy, tk.__version__, len(tk.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy, version, names = result.stdout.rsplit(maxsplit=2)
    assert heavy == "[]", heavy  # nothing heavy is loaded until a name is used
    assert version == "0.1.0" and int(names) > 20


def test_every_public_name_of_the_root_resolves():
    import transferkit as tk

    for name in tk.__all__:
        assert getattr(tk, name) is not None, name
    assert tk.TransferClassifier.__module__ == "transferkit.models.classifier"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        _ = tk.NoSuchThing


def test_matplotlib_is_imported_by_the_reporting_layer_only():
    outside = []
    for module, path in _modules().items():
        if module.startswith("transferkit.reporting"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            outside += [f"{module}: {n}" for n in names if n.split(".")[0] == "matplotlib"]
    assert not outside, outside


def test_every_exception_and_warning_class_lives_in_the_errors_module():
    import transferkit.errors as errors

    defined_elsewhere = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or module == "transferkit.errors":
                continue
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            if node.name.endswith("Error") or bases & {"Exception", "ValueError", "RuntimeError", "OSError"}:
                defined_elsewhere.append(f"{module}.{node.name}")
    assert not defined_elsewhere, defined_elsewhere
    for name in errors.__all__:
        thing = getattr(errors, name)
        if isinstance(thing, type):  # every exception a TransferKitError, every warning a TransferKitWarning
            assert issubclass(thing, errors.TransferKitError | errors.TransferKitWarning), name
    # and every warning transferkit gives goes through errors.warn: attributed to our code, never to Lightning
    direct = [
        f"{module}:{node.lineno}"
        for module, path in _modules().items()
        if module != "transferkit.errors"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn"
    ]
    assert not direct, direct


def test_lightning_private_attributes_are_read_in_one_module_only():
    from transferkit.lightning_internals import USED

    private = {name for names in USED.values() for name in names}
    found = []
    for module, path in _modules().items():
        if module == "transferkit.lightning_internals":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{module}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in private:
                found.append(f"{module}:{node.lineno} '{node.value}'")
    assert not found, found


# the modules that own a LightningModule's or LightningDataModule's hparams: they write them from their
# typed settings; every other module reads the settings (model.settings, dm.settings), never the dict
HPARAMS_OWNERS = {"transferkit/models/classifier.py", "transferkit/data/datamodule.py"}


def _is_hparams(node: ast.AST) -> bool:
    """``x.hparams`` or ``getattr(x, "hparams", ...)``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "hparams"
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value == "hparams"
    )


def test_no_module_outside_the_owners_reads_or_writes_hparams_by_key():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE.parent))
        if name in HPARAMS_OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # x.hparams["lr"], x.hparams.get("lr"), x.hparams.lr (a read or a write by key); the whole dict
            # of any LightningModule (a fingerprint of another module's recipe) is not a key
            by_key = (isinstance(node, ast.Subscript) and _is_hparams(node.value)) or (
                isinstance(node, ast.Attribute) and _is_hparams(node.value)
            )
            if by_key:
                found.append(f"{name}:{node.lineno}")
    assert not found, f"hparams read by key outside their owners (use .settings): {found}"
    # the check finds what it looks for
    sample = ast.parse('model.hparams["lr"] = 1; getattr(model, "hparams", {}).get("tta"); m.hparams.lr')
    hits = [
        n
        for n in ast.walk(sample)
        if (isinstance(n, ast.Subscript) and _is_hparams(n.value))
        or (isinstance(n, ast.Attribute) and _is_hparams(n.value))
    ]
    assert len(hits) == 3
