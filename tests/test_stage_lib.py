"""scripts/stage_lib.sh (the stage lines of demo.sh and experiment.sh): quiet stages, failures, interrupts."""
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "stages.sh"
    path.write_text(f"set -euo pipefail\nSTAGE_TAG=t\nsource {ROOT}/scripts/stage_lib.sh\n{body}\n")
    return path


def test_a_stage_silent_for_a_while_runs_to_the_end_and_a_failure_is_reported(tmp_path):
    path = script(tmp_path, f'run_stage "quiet" {tmp_path}/a.log sleep 4\necho after-quiet\n'
                            f'run_stage "fails" {tmp_path}/b.log bash -c "echo last words; exit 3"\necho never')
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=120)
    assert "after-quiet" in proc.stdout and "never" not in proc.stdout
    assert proc.returncode == 3
    assert "FAILED (exit code 3): fails" in proc.stdout and "last words" in proc.stdout


@pytest.mark.parametrize("wrapped", [False, True], ids=["command", "wrapper-shell"])
def test_sigterm_stops_the_running_stage(tmp_path, wrapped):
    marker = "317.25" if not wrapped else "317.5"  # a sleep nobody else runs
    # a wrapper shell (demo.sh's evaluation loop) does not pass a SIGTERM on: the stage's whole group is stopped
    cmd = f'bash -c "sleep {marker}; echo done"' if wrapped else f"sleep {marker}"
    path = script(tmp_path, f'run_stage "long" {tmp_path}/c.log {cmd}')
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, text=True)

    def sleeping() -> bool:
        # the sleep itself (^: not the wrapper shell, whose command line holds it too)
        return subprocess.run(["pgrep", "-f", f"^sleep {marker}"], capture_output=True).returncode == 0

    deadline = time.monotonic() + 30
    while not sleeping():   # the stage has started
        assert time.monotonic() < deadline and proc.poll() is None, "the stage's sleep never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while sleeping():   # and is gone soon after
        assert time.monotonic() < deadline, "the stage's sleep outlived the SIGTERM"
        time.sleep(0.2)
