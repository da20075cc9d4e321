"""Structural rules of the codebase, checked rather than hoped for.

* ``runtime/trusted`` (the TCB) never imports Ray, nor the untrusted or Ray-facing modules.
* ``runtime/sandbox`` (the side assumed compromised) never imports ``runtime.trusted``.
* ``import runtime`` does not import Ray; ``runtime.__all__`` names real objects.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import runtime

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "runtime"


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


def _files(folder: str) -> list[Path]:
    files = sorted((PKG / folder).glob("*.py"))
    assert files, folder
    return files


def test_trusted_core_imports_neither_ray_nor_untrusted_modules():
    forbidden = ("ray", "runtime.sandbox", "runtime.actors", "runtime.agent", "runtime.job", "runtime.cli",
                 "runtime.llm", "runtime.tool")
    for f in _files("trusted"):
        bad = {m for m in imports_of(f) if m.split(".")[0] == "ray" or m.startswith(forbidden[1:])}
        assert not bad, f"{f.name} imports {bad}"


def test_sandbox_side_never_imports_the_trusted_side():
    for f in _files("sandbox"):
        bad = {m for m in imports_of(f) if m.startswith("runtime.trusted") or m.startswith("ray")}
        assert not bad, f"{f.name} imports {bad}"


def test_import_runtime_does_not_import_ray():
    code = "import sys, runtime, runtime.trusted.supervisor, runtime.testing; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_names_exist_and_are_unique():
    assert len(runtime.__all__) == len(set(runtime.__all__))
    for name in runtime.__all__:
        assert getattr(runtime, name) is not None, name
    public = {n for n in dir(runtime) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(runtime.__all__), public - set(runtime.__all__)
