"""The package's shape, as docs/architecture.md states it: imports point down the layers, only
decoders/ knows which decoder it holds, and the training loop stays readable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edge_glass"

# Lowest first; a module may import (at module level) only from its own layer or below.
LAYERS = ["utils", "modalities", "config", "decoders", "encoders", "data", "local_models", "features", "models",
          "training", "inference", "export", "notebook_helpers", "commands", "cli"]


def _layer(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def _module_level_imports(tree: ast.Module):
    """Imports executed when the module loads (not those inside functions or TYPE_CHECKING)."""
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("edge_glass."):
                yield sub.lineno, sub.module.split(".")[1]
            elif isinstance(sub, ast.Import):
                for alias in sub.names:
                    if alias.name.startswith("edge_glass."):
                        yield sub.lineno, alias.name.split(".")[1]


def test_imports_point_down_the_layers():
    assert {_layer(p.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*.py")} - {"__init__"} <= set(LAYERS)
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(path.relative_to(PACKAGE).parts)
        if own == "__init__":
            continue
        for line, target in _module_level_imports(ast.parse(path.read_text())):
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} ({own} is below it)")
    assert not upward, "\n".join(upward)


def test_no_decoder_kind_branches_outside_decoders():
    # The decoder contract (decoders/base.py) is the only place a decoder's kind may matter.
    kind_test = re.compile(r"""(kind|decoder\.kind|\.kind)\s*(==|!=|in)\s*\(?["'](qwen|trm|causal)["']""")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "decoders":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if kind_test.search(line):
                found.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_training_loop_reads_on_a_few_screens():
    path = PACKAGE / "training" / "trainer.py"
    source = path.read_text()
    assert len(source.splitlines()) < 300
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
