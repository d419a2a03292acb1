"""The size rules of docs/ARCHITECTURE.md: no source file over 650 lines, no class over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jit_fast", "jit_kernels", "benchmarks")
MAX_FILE_LINES = 650
MAX_CLASS_LINES = 300


def oversized(root: Path) -> list[str]:
    """Every file over MAX_FILE_LINES and class over MAX_CLASS_LINES under the packages of `root`."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text()
            rel = path.relative_to(root).as_posix()
            if len(text.splitlines()) > MAX_FILE_LINES:
                found.append(f"{rel}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                    found.append(f"{rel}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    return found


def test_no_file_or_class_is_oversized() -> None:
    assert oversized(ROOT) == []


@pytest.mark.parametrize("body, want", [
    ("x = 1\n" * (MAX_FILE_LINES + 1), "jit_fast/big.py: 651 lines"),
    ("class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES, "jit_kernels/big.py: class Big 301 lines"),
], ids=["file", "class"])
def test_the_check_sees_an_oversized_file_and_class(tmp_path: Path, body: str, want: str) -> None:
    pkg = want.split("/")[0]
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "big.py").write_text(body)
    (tmp_path / pkg / "small.py").write_text("class Small:\n    x = 1\n")
    assert oversized(tmp_path) == [want]
