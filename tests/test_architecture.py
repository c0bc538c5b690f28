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


def test_no_module_imports_above_its_floor():
    bad = [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
           for m, deps in GRAPH.items() for d in deps if floor(d) > floor(m)]
    assert bad == []


def test_no_import_circles():
    def resolve(d):  # an import of a package stands for its __init__
        return d if d in GRAPH else None

    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(filter(None, map(resolve, GRAPH[m]))):
            if d == m:
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_floor_check_can_fail():
    """The checks above see upward imports: a lower module importing an entry point is reported."""
    assert floor("rlt.data.loading") < floor("rlt.train")
    assert "rlt.data.formats" in GRAPH["rlt.data.loading"]
    assert "rlt.trainers.grpo_run" in GRAPH["rlt.train"]  # function-level imports are seen


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
