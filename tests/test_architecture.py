"""The shape of the code, checked: no module uses another's private names, imports stay light.

The layer contract itself (which package may import which, no cycles) is import-linter's,
configured in pyproject.toml and run by scripts/test.sh (``lint-imports``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "headwater"


def _files() -> list[Path]:
    return sorted(SRC.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def _module_of(path: Path) -> str:
    if path.is_relative_to(SRC):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return f"tests.{path.stem}"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = True  # resolved relative to the module's package
    base = base[: len(base) - node.level + (0 if is_package else 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _violations(path: Path) -> list[str]:
    """Private names of a headwater module used outside it: imported, or read as ``module._name``."""
    module = _module_of(path)
    own = module if path.name != "__init__.py" else module
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> headwater module it is bound to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(module if path.name != "__init__.py" else module + ".__init__", node)
            if not src.startswith("headwater") or src == own:
                continue
            for a in node.names:
                if _private(a.name):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {src}.{a.name}")
                aliases[a.asname or a.name] = f"{src}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("headwater"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and target != own:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {target}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names() -> None:
    found = [v for p in _files() for v in _violations(p)]
    assert found == [], "\n".join(found)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    bad = SRC / "_arch_probe_tmp.py"
    bad.write_text("from .scoring import _secret\nimport headwater.index as hwi\nx = hwi._thing\n")
    try:
        assert len(_violations(bad)) == 2
    finally:
        bad.unlink()


def test_import_headwater_is_light() -> None:
    """``import headwater`` (and reaching its main classes) loads neither transformers, datasets nor scipy."""
    code = (
        "import sys, headwater as hw; hw.Attributor; hw.LanguageModelingTask; hw.Scores; "
        "print(sorted(m for m in ('transformers', 'datasets', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
    bare = "import sys, headwater; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


def test_the_command_line_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom headwater.cli import app\n"
        "r = CliRunner().invoke(app, ['score', '--help'])\nassert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
