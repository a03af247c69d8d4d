"""Every public module, class and function of ``mgie/`` and ``train/`` has a docstring (the style rule)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def undocumented(source: str) -> list[str]:
    """Names (with line numbers) of public definitions in ``source`` that have no docstring.

    Public: a name without a leading underscore, defined at module level or in a public class
    (helpers nested in a function are private to it).
    """
    tree = ast.parse(source)
    missing = [] if ast.get_docstring(tree) else ["<module>"]
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        ) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(f"{node.name} (line {node.lineno})")
            if isinstance(node, ast.ClassDef):
                todo[:0] = node.body
    return missing


def test_the_checker_finds_what_is_missing():
    src = (
        '"""m."""\n\ndef f():\n    """f."""\n\n    def nested():\n        pass\n\n'
        "class C:\n    def h(self):\n        pass\n\n    def _p(self):\n        pass\n\n"
        "def g():\n    pass\n\nclass _Private:\n    def k(self):\n        pass\n"
    )
    assert undocumented(src) == ["C (line 9)", "h (line 10)", "g (line 16)"]
    assert undocumented("x = 1\n") == ["<module>"]


def test_every_public_definition_has_a_docstring():
    files = sorted((ROOT / "mgie").rglob("*.py")) + sorted((ROOT / "train").rglob("*.py"))
    assert len(files) > 20
    missing = {
        str(f.relative_to(ROOT)): m for f in files if (m := undocumented(f.read_text(encoding="utf-8")))
    }
    assert not missing, f"public definitions without a docstring: {missing}"
