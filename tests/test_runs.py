"""Run bookkeeping: where reporting writes."""
import os

import pytest


def test_wandb_writes_under_output_dir_into_the_configured_project(tmp_path, monkeypatch):
    from rlt.config import build_train_settings, compose
    from rlt.runs import configure_reporting

    for key in ("WANDB_PROJECT", "WANDB_DIR"):  # set, then removed: monkeypatch restores them (or their absence)
        monkeypatch.setenv(key, "before")
        monkeypatch.delenv(key)
    s = build_train_settings(compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'o'}", "report_to=wandb",
                                                          "wandb_project=my-rlt"]), num_processes=1)
    configure_reporting(s.run, s.args)
    assert os.environ["WANDB_PROJECT"] == "my-rlt" and os.environ["WANDB_DIR"] == str((tmp_path / "o").resolve())
    exported = build_train_settings(compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'o'}", "report_to=wandb"]),
                                    num_processes=1)
    os.environ["WANDB_PROJECT"] = "exported"
    configure_reporting(exported.run, exported.args)   # no wandb_project: the user's exported project is kept
    assert os.environ["WANDB_PROJECT"] == "exported"
    os.environ.pop("WANDB_PROJECT")
    configure_reporting(exported.run, exported.args)   # neither: rlt's
    assert os.environ["WANDB_PROJECT"] == "rlt"
    s = build_train_settings(compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'p'}"]), num_processes=1)
    for key in ("WANDB_PROJECT", "WANDB_DIR"):
        os.environ.pop(key)
    configure_reporting(s.run, s.args)  # report_to none: nothing is set
    assert "WANDB_PROJECT" not in os.environ and "WANDB_DIR" not in os.environ


@pytest.mark.slow
def test_offline_wandb_run_lands_in_output_dir(tmp_path):
    import sys

    from conftest import run_cmd

    out = tmp_path / "o"
    run_cmd([sys.executable, "-m", "rlt.train", "tiny_teacher_sft", f"output_dir={out}", "max_steps=2",
             "report_to=wandb"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}, cwd=tmp_path)
    assert list((out / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "train.log").exists()


def test_train_and_save_waits_for_every_rank_then_ends_the_process_group(tmp_path):
    """The last thing each rank does: wait for the others' saves, then transformers' Trainer.end (accelerate's
    end_training, which destroys the process group); a rank exiting with the group alive once aborted in the
    backend's teardown while rank 0 still saved."""
    from types import SimpleNamespace

    import torch

    from rlt.runs import RunConfig, train_and_save

    calls = []

    class Trainer:
        args = SimpleNamespace(report_to=[], output_dir=str(tmp_path))
        model = torch.nn.Linear(1, 1)
        accelerator = SimpleNamespace(is_main_process=True, unwrap_model=lambda m: m,
                                      wait_for_everyone=lambda: calls.append("wait"))

        def train(self, resume_from_checkpoint=None):
            calls.append("train")

        def save_state(self):
            calls.append("save_state")

        def save_model(self, path):
            calls.append("save_model")

        def end(self):
            calls.append("end")

    tokenizer = SimpleNamespace(save_pretrained=lambda path: calls.append("tokenizer"))
    train_and_save(Trainer(), tokenizer, RunConfig(trainer="sft"), str(tmp_path))
    assert calls == ["train", "save_state", "save_model", "tokenizer", "wait", "end"]
