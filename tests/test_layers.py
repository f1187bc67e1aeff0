"""The package's folders are its layers: imports go downward only, no cycle anywhere, no
private name crosses a module, a function-level import says why, and design.md's table of
layers lists every module."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlecli"
LAYERS = ("nn", "safe", "data", "run", "use", "sweep")
LINT = Path(sys.executable).parent / "lint-imports"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_are_kept():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 3 kept, 0 broken." in res.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("nn/model.py", "from mlecli.sweep import runs  # noqa", "Layers import downward only BROKEN"),
    ("safe/errors.py", "from mlecli.nn import model  # noqa", "Layers import downward only BROKEN"),
    ("data/idx.py", "from mlecli.nn import model  # noqa", "The data layer never needs the network BROKEN"),
    ("run/checkpoint.py", "    from mlecli.run import train  # lazy: a deliberate cycle",
     "No cycle between a layer's modules BROKEN"),
])
def test_the_contracts_refuse_an_upward_import_or_a_cycle_even_inside_a_function(tmp_path, module, line, broken):
    shutil.copytree(PACKAGE, tmp_path / "mlecli", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "mlecli" / module
    text = target.read_text()
    if line.startswith(" "):  # inside a function: the first def's body
        text = re.sub(r"^(def [^\n]*\n(?:    [^\n]*\n)*?    \"\"\"(?:.|\n)*?\"\"\"\n)", lambda m: m.group(1) + line + "\n",
                      text, count=1, flags=re.M)
        assert line in text
    else:  # after the module's last top-level import
        body = ast.parse(text).body
        last = max((n.end_lineno for n in body if isinstance(n, (ast.Import, ast.ImportFrom))), default=body[0].end_lineno)
        lines = text.splitlines()
        text = "\n".join([*lines[:last], line, *lines[last:]]) + "\n"
    target.write_text(text)
    res = lint(tmp_path)
    assert res.returncode == 1 and broken in res.stdout, res.stdout + res.stderr


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlecli"):
            yield node, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mlecli"):
                    yield node, a.name, []


def test_no_module_imports_another_modules_private_name():
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> module, for `from mlecli.x import y as z` of a module
        for node, module, names in _imports(tree):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__") and module != name]
            for a in node.names:
                aliases[a.asname or a.name] = f"{module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert found == []


# A function-level import is for a dependency that is optional or slow to load, or for
# code that must not load before something is set; its line says which, after "# lazy:".
# cli.py imports each command's modules inside the command (its docstring says why).
LAZY = re.compile(r"#\s*lazy: \S")


def test_every_function_level_import_says_why():
    unmarked = []
    for name, path in modules().items():
        if name == "mlecli.cli":
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                said = lines[node.lineno - 1] + " " + lines[node.lineno - 2]
                if not LAZY.search(said):
                    unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert unmarked == []


def test_each_layer_says_what_it_owns_and_what_it_may_import():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert "May import:" in doc and len(doc) > 200, layer


def test_design_md_lists_every_module_in_its_layer_and_no_other():
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("<!-- layers -->")[1]
    listed = set(re.findall(r"`(mlecli/[\w/]+\.py)`", table))
    actual = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent == PACKAGE}
    assert listed == actual
