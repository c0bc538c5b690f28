"""The package's floors: nothing imports a module above its own floor, and there are no import circles."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rlt"
# Lowest floor first. A module may import its own floor or lower ones, never a higher one.
FLOORS = [
    ("rlt", "rlt.errors", "rlt.logging_utils", "rlt.procs", "rlt.stats"),
    ("rlt.data", "rlt.models"),
    ("rlt.rewards", "rlt.generation", "rlt.answers"),
    ("rlt.config", "rlt.runs", "rlt.trainers", "rlt.testing"),
    ("rlt.train", "rlt.score", "rlt.distill", "rlt.eval", "rlt.plot", "rlt.report", "rlt.launch_with_server", "rlt.cli"),
    ("rlt.experiment",),  # runs the entry points above, stage by stage
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(mod: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{mod} is on no floor: add it to FLOORS"
    return best[0]


def imports_of(path: Path) -> set[str]:
    """Every rlt module imported anywhere in the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rlt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlt") and node.level == 0:
            for a in node.names:  # `from rlt.data import countdown` imports the submodule
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return out


GRAPH = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
            for m, deps in graph.items() for d in deps if floor(d) > floor(m)]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(d for d in graph[m] if d in graph):   # an import of a package stands for its __init__
            if d == m:
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_module_imports_above_its_floor():
    assert upward_imports(GRAPH) == []


def test_no_import_circles():
    assert import_cycles(GRAPH) == []


def test_the_checks_can_fail():
    """An upward import and a circle, planted in a copy of the graph, are reported; function-level imports are
    part of the graph."""
    assert "rlt.trainers.grpo_run" in GRAPH["rlt.train"]   # a function-level import
    planted = {**GRAPH, "rlt.data.loading": GRAPH["rlt.data.loading"] | {"rlt.train"}}
    assert upward_imports(planted) == ["rlt.data.loading (floor 1) imports rlt.train (floor 4)"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


ENTRY_POINTS = {
    "rlt.train": ["student_model=None", "kl_penalty_reward_coeff=[3.0, 0.03]", "vllm_weight_sync='auto'",
                  "dataset_id_or_path=None", "use_peft=False", "GRPOConfig"],
    "rlt.score": ["input=None", "teacher_temperature=0.7", "student_model=None", "data_format='auto'"],
    "rlt.distill": ["num_explanations=4", "select='all'", "missing_end_tag='drop'", "vllm_host=None",
                    "max_prompt_length=16384"],
    "rlt.eval": ["n_samples=1", "temperature=0.0", "max_prompt_length=16384", "dataset_split='train'"],
    "rlt.launch_with_server": ["NUM_VLLM", "vllm_port=8765"],
    "rlt.plot": ["run_dir"],
    "rlt.report": ["demo_dir"],
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_entry_point_has_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ENTRY_POINTS[module]:
        assert key in proc.stdout, key
