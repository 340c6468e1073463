"""The layering of docs/architecture.md, checked on the source: every keel import (lazy ones
inside functions included) points to the same layer or a lower one, no two modules import each
other in a cycle, and no private name is imported from another module."""

import ast
from pathlib import Path

import keel

ROOT = Path(keel.__file__).parent

# Lowest first; a module belongs to the longest prefix listed. Keep in step with docs/architecture.md.
LAYERS = [
    ["keel.errors", "keel.io", "keel.config", "keel.device", "keel.epochs", "keel.optim", "keel.runlog",
     "keel.logprobs", "keel.correction", "keel.trackers"],
    ["keel.models", "keel.vocab", "keel.tasks", "keel.distributed", "keel.report"],
    ["keel.engine", "keel.resilience"],
    ["keel.completions", "keel.serve", "keel.train.loop"],
    ["keel.evaluate", "keel.export", "keel.train", "keel.label"],
    ["keel.rl"],
    ["keel.expert", "keel.demo"],
    ["keel.cli", "keel.__main__"],
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    if module == "keel":  # the package itself: its version only
        return 0
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return max(matches)[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("keel",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every keel import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "keel":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "") if sub in known else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "keel"]
    return found


def test_imports_never_point_up_a_layer():
    known = modules()
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, path in known.items() for t, _ in imports(path, known) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_modules():
    known = modules()
    private = [f"{m} imports {name} from {t}" for m, path in known.items()
               for t, name in imports(path, known) if name.startswith("_")]
    assert not private, "\n".join(private)


def test_no_import_cycles():
    known = modules()
    edges = {m: {t for t, _ in imports(p, known) if t in known and t != m} for m, p in known.items()}
    state: dict[str, str] = {}  # grey while on the DFS path, black when done
    cycles = []

    def visit(m, path):
        state[m] = "grey"
        for t in sorted(edges[m]):
            if state.get(t) == "grey":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "black"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
