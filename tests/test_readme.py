"""Every command in README's bash blocks is checked: the cheap ones run as written, the expensive ones
(training launches, tool runs on production models) have their recipe and every key validated exactly as
the entry point would before starting anything. A command of a kind this test does not know fails it."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = re.compile(r"^\[|\||\.\.\.|^[A-Z_]+$|=[A-Z_]+$|NUM_")  # [optional] a|b ... NAME: a usage line


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        heredoc = None
        for line in joined.splitlines():
            if heredoc is not None:  # the body of a here-document is not a command
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if m := re.search(r"<<'?(\w+)'?", line):
                heredoc = m.group(1)
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith(("#", "$")):
                cmds.append(line)
    return cmds


COMMANDS = readme_commands()


def is_template(tokens) -> bool:
    return any(TEMPLATE.search(t) for t in tokens)


def check_training(recipe: str, overrides: list[str], n: int) -> None:
    from rlt.config import build_train_settings, compose

    from rlt.trainers.grpo_run import validate_grpo

    flags = {"offload", "zero1"}
    settings = build_train_settings(compose(recipe, [o for o in overrides if o not in flags]), num_processes=n)
    if settings.run.trainer == "teacher_grpo":  # the RL startup checks (batch shapes, student) too
        validate_grpo(settings, n)


def tool_classes(module: str) -> tuple[type, tuple[type, ...]]:
    from rlt.data.config import DataConfig, FormatConfig
    from rlt.generation.config import RolloutConfig
    from rlt.models import ModelConfig
    from rlt.rewards.config import RewardConfig

    if module == "rlt.score":
        from rlt.score import ScoreConfig as tool
        return tool, (ModelConfig, FormatConfig, RewardConfig)
    if module == "rlt.distill":
        from rlt.distill import DistillConfig as tool
        return tool, (ModelConfig, DataConfig, FormatConfig, RewardConfig, RolloutConfig)
    from rlt.eval import EvalConfig as tool
    return tool, (ModelConfig, DataConfig, FormatConfig, RolloutConfig)


def check_tool(module: str, args: list[str]) -> None:
    from rlt.config import compose_tool

    tool, concerns = tool_classes(module)
    compose_tool(module, tool, concerns, args)


def check_tool_usage_keys(module: str, args: list[str]) -> None:
    """A usage line's values are placeholders, but its keys must be keys of the tool (or their other names)."""
    import dataclasses

    from rlt.config import RENAMES

    tool, concerns = tool_classes(module)
    accepted = {f.name for c in (tool, *concerns) for f in dataclasses.fields(c)} | set(RENAMES)
    keys = [m.group(1) for a in args if (m := re.match(r"\[?\+?([a-z_]+)=", a))]
    assert keys and not [k for k in keys if k not in accepted], [k for k in keys if k not in accepted]


def test_readme_has_commands():
    assert len(COMMANDS) >= 10


def names_flag(usage: str, flag: str) -> bool:
    """``flag`` appears in a usage text as a whole option (``--out`` is not named by ``--out-dir``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage) is not None


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command(cmd, tmp_path):
    if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\$\(.*\)", cmd.strip()):  # a shell variable, e.g. KEY=$(python -c ...)
        return
    tokens = shlex.split(cmd)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # environment assignments
        tokens = tokens[1:]
    head = tokens[0]
    if head in ("./launch.sh", "./launch_with_server.sh"):
        # a remote-server run on another machine: its placeholders have values here
        tokens = [{"T": "4"}.get(t, t.replace("=OTHER_HOST", "=gpu-node-2")) for t in tokens]
        if is_template(tokens):
            assert tokens[1:] == ["NUM_VLLM_GPUS", "NUM_TRAIN_GPUS", "RUN_CFG", "[overrides...]", "[offload|zero1]"], \
                f"a launch line this test does not check: {cmd}"
            return
        n = int(tokens[1] if head == "./launch.sh" else tokens[2])
        recipe, overrides = (tokens[2], tokens[3:]) if head == "./launch.sh" else (tokens[3], tokens[4:])
        check_training(recipe, overrides, n)
    elif head.startswith("scripts/") or head.startswith(".venv/bin/python"):
        script, args = (tokens[0], tokens[1:]) if head.startswith("scripts/") else (tokens[1], tokens[2:])
        assert (ROOT / script).is_file(), script
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        if flags:   # each flag the README gives is one the script's --help names
            runner = ["bash"] if script.endswith(".sh") else [sys.executable]
            usage = subprocess.run(runner + [script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert usage.returncode == 0 and all(names_flag(usage.stdout, f) for f in flags), (cmd, usage.stdout[-2000:])
    elif head in ("python", "python3") and tokens[1] == "-":  # a script given on stdin (here-document)
        return
    elif head in ("python", "python3") and tokens[1] == "-m":
        module, args = tokens[2], tokens[3:]
        cheap = ("--cfg" in args or "--help" in args or module in ("rlt.data.countdown", "rlt.testing.tiny_model")
                 or ("--check" in args and not is_template(args)))
        if cheap and not is_template(args):
            args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
            proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        elif module in ("rlt.score", "rlt.distill", "rlt.eval"):
            if is_template(args):
                check_tool_usage_keys(module, args)
            else:
                check_tool(module, args)
        elif module == "vllm.entrypoints.openai.api_server":   # rlt's part of it: the middleware it names
            import importlib

            path = args[args.index("--middleware") + 1]
            mod, _, name = path.rpartition(".")
            assert callable(getattr(importlib.import_module(mod), name)), path
        elif module in ("rlt.plot", "rlt.report"):   # each flag the README gives is one its --help names
            usage = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=120)
            flags = [a.split("=")[0] for a in args if a.startswith("--")]
            assert usage.returncode == 0 and usage.stdout.startswith("usage:"), usage.stderr[-2000:]
            assert all(names_flag(usage.stdout, f) for f in flags), (cmd, usage.stdout)
        elif module == "rlt.train":
            assert is_template(args), f"rlt.train example not checked: {cmd}"
        else:
            pytest.fail(f"unknown module in README: {cmd}")
    elif head in ("cd", "git", "pip"):
        return
    else:
        pytest.fail(f"README command of a kind this test does not know: {cmd}")
