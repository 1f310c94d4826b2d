"""Imports flow one way (../shared/STYLE.md): config, batch <- data, model <- checkpoint <- train <- cli."""
import ast
from pathlib import Path

import varlen

ROOT = Path(varlen.__file__).parent
# A package may import only from the packages listed for it (and from itself).
ALLOWED = {
    "config": set(), "batch": set(),
    "data": {"config", "batch"},
    "model": {"config", "batch"},
    "checkpoint": {"config", "batch", "data", "model"},
    "train": {"config", "batch", "data", "model", "checkpoint", "plots", "precision"},
    "precision": {"config", "model"},  # model: int8 quantization of a loaded model (model/quant.py)
    "generate": {"batch"},
    "plots": set(),
}


def internal_imports(path: Path) -> set[str]:
    pkg_parts = path.relative_to(ROOT).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[:len(pkg_parts) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                if mod:
                    found.add(mod[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("varlen."):
                found.add(node.module.split(".")[1])
    return found


def test_imports_flow_one_way():
    for path in ROOT.rglob("*.py"):
        top = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if top not in ALLOWED:
            continue  # cli and __main__ may import anything
        bad = internal_imports(path) - ALLOWED[top] - {top}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
