"""The package's layers, checked: every import (module level or inside a function) goes to the same or a
lower layer, and the module graph has no cycle. The README's "Layers" section states the same order."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "xfer"

# bottom-up; a module may import its own layer and the layers below it (never above, never in a loop)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("xfer", "xfer.hashing", "xfer.registry", "xfer.io", "xfer.options", "xfer.layout",
                    "xfer.trial", "xfer.contract", "xfer.timm_names", "xfer.plugins", "xfer.source_accuracy")),
    ("components", ("xfer.data", "xfer.metrics", "xfer.models")),
    ("training", ("xfer.engine", "xfer.logistic", "xfer.lambda_path", "xfer.features", "xfer.estimators")),
    ("regimes", ("xfer.regimes",)),
    ("study", ("xfer.spec", "xfer.select", "xfer.stats", "xfer.report", "xfer.report_curves",
               "xfer.report_estimators", "xfer.report_regularizers", "xfer.report_asha", "xfer.report_factors",
               "xfer.tracking", "xfer.progress", "xfer.k8s", "xfer.cost")),
    ("orchestration", ("xfer.sweep", "xfer.asha", "xfer.final", "xfer.estimate", "xfer.distributed")),
    ("interface", ("xfer.cli",)),
]


def module_names() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = module_names()


def imports_of(module: str) -> set[str]:
    """xfer modules ``module`` imports anywhere in its source (``from pkg import sub`` counts as ``pkg.sub``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "xfer"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "xfer":
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs if subs and len(subs) == len(node.names) else subs | {node.module}
    return {m for m in out if m != module}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's Layers section)")
    return best[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = layer_of(module)
    upward = sorted(m for m in imports_of(module) if layer_of(m) > mine)
    assert not upward, (f"{module} ({LAYERS[mine][0]}) imports {', '.join(upward)} from a higher layer "
                        f"({', '.join(LAYERS[layer_of(m)][0] for m in upward)})")


def test_no_import_cycles():
    graph = {m: imports_of(m) & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The test above can fail: an upward import and a cycle planted in fake modules are reported."""
    fake = {"xfer.hashing": tmp_path / "h.py", "xfer.trial": tmp_path / "t.py"}
    fake["xfer.hashing"].write_text("def f():\n    from xfer.trial import TrialSpec\n")
    fake["xfer.trial"].write_text("from xfer.hashing import f\n")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {**MODULES, **fake})
    assert imports_of("xfer.hashing") == {"xfer.trial"}
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    fake["xfer.hashing"].write_text("import xfer.sweep\n")
    with pytest.raises(AssertionError, match=r"xfer.hashing \(foundation\) imports xfer.sweep"):
        test_imports_go_down_the_layers("xfer.hashing")
