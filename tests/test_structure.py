"""The shape of the code: imports run one way (common <- kernels <- pipeline <- export <- dfq),
no module imports dfq inside a function, no code outside the target registry compares target
names, and functions and modules stay small."""
import ast
from pathlib import Path

import pytest

from dfq.export.targets import target_names

REPO = Path(__file__).resolve().parents[1]
# folder -> installed package; the layer is the position in this list
PACKAGES = [("common", "dfq.common"), ("kernels", "dfq.kernels"), ("pipeline", "dfq.pipeline"),
            ("export", "dfq.export"), ("dfq", "dfq")]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _modules():
    for folder, package in PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield path, ".".join([package, *parts]), path.name == "__init__.py"


def layer(module: str) -> int:
    for i, (_, package) in enumerate(PACKAGES[:-1]):
        if module == package or module.startswith(package + "."):
            return i
    return len(PACKAGES) - 1


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported dfq module, line, inside a function) for every import statement."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                prefix = base[:len(base) - child.level + 1] if child.level else []
                src = ".".join(prefix + ([child.module] if child.module else []))
                names = [src] + [f"{src}.{a.name}" for a in child.names]
            for name in names:
                if name == "dfq" or name.startswith("dfq."):
                    found.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = list(_modules())


@pytest.mark.parametrize("path,module,is_package", MODULES, ids=[m for _, m, _ in MODULES])
def test_imports_run_one_way(path, module, is_package):
    tree = ast.parse(path.read_text())
    problems = []
    for name, line, in_function in _imports(tree, module, is_package):
        if layer(name) > layer(module):
            problems.append(f"{path.name}:{line} imports {name} (a higher layer)")
        if in_function:
            problems.append(f"{path.name}:{line} imports {name} inside a function")
    assert not problems, problems


def test_the_layer_checker_catches_a_reverse_import():
    tree = ast.parse("from dfq.export.targets import get_target\ndef f():\n    from dfq import job\n")
    found = _imports(tree, "dfq.pipeline.quantize", False)
    assert [(n, layer(n) > layer("dfq.pipeline.quantize"), f) for n, _, f in found] == [
        ("dfq.export.targets", True, False), ("dfq.export.targets.get_target", True, False), ("dfq", True, True),
        ("dfq.job", True, True)]


def _compares_target_name(node: ast.AST, names: set[str]) -> bool:
    def constants(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value
        elif isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            for e in n.elts:
                yield from constants(e)
    return isinstance(node, ast.Compare) and any(
        c in names for side in [node.left, *node.comparators] for c in constants(side))


def test_no_target_name_comparisons_outside_the_registry():
    names = set(target_names())
    problems = []
    for path, module, _ in MODULES:
        if module.startswith("dfq.export.targets"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _compares_target_name(node, names):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not problems, problems
    assert _compares_target_name(ast.parse('t == "tensorrt"').body[0].value, names)
    assert _compares_target_name(ast.parse('t in ("x", "onnxruntime")').body[0].value, names)


def test_functions_and_modules_stay_small():
    problems = []
    for path, _, _ in MODULES:
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    problems.append(f"{path.relative_to(REPO)}:{node.name} ({n} lines)")
    assert not problems, problems
