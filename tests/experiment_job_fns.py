"""Job functions for tests of rlt.experiment.jobs (run in its spawned workers as "experiment_job_fns:NAME")."""
import time
from pathlib import Path


def wait_for_then_write(path: str, wait_for: str) -> dict:
    """Finishes only after ``wait_for`` exists (the failing job has failed), so it is still running then."""
    deadline = time.time() + 120
    while not Path(wait_for).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)   # well after the failure: only a runner that lets running jobs finish sees this write
    Path(path).write_text("done")
    return {"wrote": path}


def fail_after_writing(path: str) -> dict:
    Path(path).write_text("failing")
    raise RuntimeError("injected failure")
