"""Every accelerate config under cfgs/ passes accelerate's own DeepSpeed checks, launched as launch.sh launches it.

accelerate refuses, in each training process, an accelerate config file that
sets DeepSpeed fields (``mixed_precision`` included when it comes from the file
rather than the command line) next to ``--deepspeed_config_file``. launch.sh
passes different arguments with and without CUDA, so this test:

1. runs the real launch.sh with a stand-in ``python`` on PATH that records the
   ``accelerate launch`` arguments instead of launching (``python -c`` probes
   go to the real interpreter, where ``torch.cuda.is_available()`` answers True
   when CUDA is pretended; ``python -m rlt...`` steps are skipped),
2. feeds those arguments to accelerate's ``launch_command`` (its argument
   validation and DeepSpeed field bookkeeping) with the launcher replaced by a
   recorder,
3. builds the environment accelerate would give the training processes
   (``prepare_deepspeed_cmd_env``) and constructs ``DeepSpeedPlugin()`` in it,
   which runs accelerate's ``_deepspeed_config_checks`` as a worker does.

The field names are accelerate's; none are listed here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """\
import os
if os.environ.get("RLT_TEST_FAKE_CUDA") == "1":
    import torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
"""

FAKE_PYTHON = """\
#!/bin/sh
# Stand-in for the python launch.sh calls: records `-m accelerate.commands.launch ARGS`; succeeds at once for
# `-m rlt...` (the trainer and its pre-flight check are not under test); runs `-c` probes for real, with
# torch.cuda.is_available() answering True when RLT_TEST_DEVICE=cuda. `-m rlt.procs run -- CMD` (the process
# guard launch.sh runs accelerate under) runs CMD.
if [ "$1" = "-m" ] && [ "$2" = "rlt.procs" ] && [ "$3" = "run" ] && [ "$4" = "--" ]; then
  shift 4
  exec "$@"
fi
if [ "$1" = "-m" ] && [ "$2" = "accelerate.commands.launch" ]; then
  shift 2
  exec "{real}" -c 'import json, os, sys; json.dump(sys.argv[1:], open(os.environ["RLT_TEST_CAPTURE"], "w"))' "$@"
fi
case "$1 $2" in "-m rlt."*) exit 0 ;; esac
RLT_TEST_FAKE_CUDA=0
if [ "$1" = "-c" ] && [ "$RLT_TEST_DEVICE" = cuda ]; then RLT_TEST_FAKE_CUDA=1; fi
export RLT_TEST_FAKE_CUDA
exec "{real}" "$@"
"""


def accelerate_configs() -> list[Path]:
    """YAML files under cfgs/ that are accelerate configs (not Hydra ones)."""
    found = []
    for path in sorted((ROOT / "cfgs").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and {"distributed_type", "compute_environment"} & data.keys():
            found.append(path)
    return found


_CAPTURED: dict[tuple[str, str], list[str]] = {}


def launch_sh_args(tmp_root: Path, device: str, flag: str) -> list[str]:
    """The arguments launch.sh gives `accelerate launch` (device: cuda|cpu, flag: ''|zero1|offload)."""
    key = (device, flag)
    if key in _CAPTURED:
        return _CAPTURED[key]
    work = tmp_root / f"{device}-{flag or 'zero3'}"
    (work / "bin").mkdir(parents=True)
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    fake = work / "bin" / "python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(0o755)
    capture = work / "argv.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(
        PATH=f"{work / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(work),  # keeps launch.sh from putting .venv/bin first
        PYTHONPATH=os.pathsep.join(p for p in (str(work / "site"), env.get("PYTHONPATH", "")) if p),
        RLT_TEST_CAPTURE=str(capture),
        RLT_TEST_DEVICE=device,
    )
    cmd = ["bash", str(ROOT / "launch.sh"), "1", "cfgs/run_cfg/tiny_teacher_rlt.yaml", "output_dir=/tmp/unused"]
    if flag:
        cmd.append(flag)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and capture.exists(), (
        f"launch.sh did not reach accelerate launch (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _CAPTURED[key] = json.loads(capture.read_text())
    return _CAPTURED[key]


def with_config_file(argv: list[str], config: Path) -> list[str]:
    out = list(argv)
    i = out.index("--config_file")
    out[i + 1] = str(config)
    return out


def run_accelerate_checks(argv: list[str], device: str, monkeypatch) -> dict:
    """accelerate's launch_command + the worker-side DeepSpeedPlugin checks; returns the launched env."""
    import accelerate.commands.launch as launch_mod
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    if device == "cuda":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(launch_mod, "is_bf16_available", lambda *a, **k: True)
    launched = {}

    def record(args):
        launched["args"] = args

    def unexpected(args):
        raise AssertionError("accelerate chose a launcher other than DeepSpeed for launch.sh's arguments")

    monkeypatch.setattr(launch_mod, "deepspeed_launcher", record)
    for name in ("simple_launcher", "multi_gpu_launcher", "tpu_launcher", "tpu_pod_launcher"):
        monkeypatch.setattr(launch_mod, name, unexpected)
    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)

    args = launch_mod.launch_command_parser().parse_args(argv)
    launch_mod.launch_command(args)
    assert "args" in launched, "accelerate did not take the DeepSpeed launcher"
    _, env = prepare_deepspeed_cmd_env(launched["args"])
    worker_env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    for k, v in worker_env.items():
        monkeypatch.setenv(k, v)
    assert worker_env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), "launch.sh passed no --deepspeed_config_file"
    DeepSpeedPlugin()  # raises ValueError when accelerate refuses the config file's fields
    return worker_env


CONFIGS = accelerate_configs()


def test_there_is_an_accelerate_config():
    assert ROOT / "cfgs" / "accelerate" / "deepspeed.yaml" in CONFIGS


@pytest.mark.parametrize("flag", ["", "zero1", "offload"], ids=["zero3", "zero1", "offload"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_accelerate_accepts_config_next_to_deepspeed_json(config, device, flag, tmp_path_factory, monkeypatch):
    argv = with_config_file(launch_sh_args(tmp_path_factory.getbasetemp() / "launch", device, flag), config)
    try:
        env = run_accelerate_checks(argv, device, monkeypatch)
    except ValueError as err:
        pytest.fail(f"{config.relative_to(ROOT)} with launch.sh on {device}: accelerate refuses it: {err}")
    expected = {"": "zero3.json", "zero1": "zero1.json", "offload": "zero3_offload.json"}[flag]
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith(expected)


def test_check_catches_mixed_precision_from_the_config_file(tmp_path, tmp_path_factory, monkeypatch):
    """The same machinery refuses a config file that sets mixed_precision when CUDA is present."""
    data = yaml.safe_load((ROOT / "cfgs" / "accelerate" / "deepspeed.yaml").read_text())
    data["mixed_precision"] = "bf16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    argv = with_config_file(launch_sh_args(tmp_path_factory.getbasetemp() / "launch", "cuda", ""), bad)
    # launch.sh passes the precision on the command line; a user calling accelerate without it hits the refusal
    if "--mixed_precision" in argv:
        i = argv.index("--mixed_precision")
        argv = argv[:i] + argv[i + 2:]
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        run_accelerate_checks(argv, "cuda", monkeypatch)
