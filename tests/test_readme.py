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


def check_tool(module: str, args: list[str]) -> None:
    from rlt.config import compose_tool
    from rlt.data.config import DataConfig, FormatConfig
    from rlt.generation.config import RolloutConfig
    from rlt.models import ModelConfig
    from rlt.rewards.config import RewardConfig

    if module == "rlt.score":
        from rlt.score import ScoreConfig as tool
        concerns = (ModelConfig, FormatConfig, RewardConfig)
    elif module == "rlt.distill":
        from rlt.distill import DistillConfig as tool
        concerns = (ModelConfig, DataConfig, FormatConfig, RewardConfig, RolloutConfig)
    else:
        from rlt.eval import EvalConfig as tool
        concerns = (ModelConfig, DataConfig, FormatConfig, RolloutConfig)
    compose_tool(module, tool, concerns, args)


def test_readme_has_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command(cmd, tmp_path):
    if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\$\(.*\)", cmd.strip()):  # a shell variable, e.g. KEY=$(python -c ...)
        return
    tokens = shlex.split(cmd)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # environment assignments
        tokens = tokens[1:]
    head = tokens[0]
    if head in ("./launch.sh", "./launch_with_server.sh"):
        if is_template(tokens):
            return
        n = int(tokens[1] if head == "./launch.sh" else tokens[2])
        recipe, overrides = (tokens[2], tokens[3:]) if head == "./launch.sh" else (tokens[3], tokens[4:])
        check_training(recipe, overrides, n)
    elif head.startswith("scripts/") or head.startswith(".venv/bin/python"):
        script = tokens[0] if head.startswith("scripts/") else tokens[1]
        assert (ROOT / script).is_file(), script
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
            if not is_template(args):
                check_tool(module, args)
        elif module in ("rlt.plot", "rlt.report", "rlt.train", "vllm.entrypoints.openai.api_server"):
            assert module != "rlt.train" or is_template(args), f"rlt.train example not checked: {cmd}"
        else:
            pytest.fail(f"unknown module in README: {cmd}")
    elif head in ("cd", "git", "pip"):
        return
    else:
        pytest.fail(f"README command of a kind this test does not know: {cmd}")
