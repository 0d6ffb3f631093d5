"""The step runner's in-process steps: the entry point's exit status decides, as for a subprocess."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.workflow.runner import Runner, StepFailed
from lib.workflow.steps import Step
from workflow_support import experiment_data, write_config


def report_step(exp: Path, config: Path) -> Step:
    return Step("report", ("-m", "lib.workflow.report", "--config", str(config)), exp,
                ("results.md",), owns_workdir=False, in_process=True)


def record(exp: Path) -> dict:
    return json.loads((exp / ".workflow" / "report.json").read_text())


def test_in_process_step_with_a_user_error_fails_with_exit_status_2(tmp_path, capsys):
    exp = tmp_path / "exp"
    with pytest.raises(StepFailed, match=r"step report failed \(exit status 2\)"):
        Runner(exp).run([report_step(exp, tmp_path / "missing.yaml")])
    assert capsys.readouterr().err.startswith("error: config file")
    assert record(exp)["status"] == "started"


def test_in_process_step_that_raises_fails_with_exit_status_1(tmp_path, caplog):
    exp = tmp_path / "exp"
    config = write_config(tmp_path, experiment_data(tmp_path))  # no stage has run: nothing to report
    with pytest.raises(StepFailed, match=r"step report failed \(exit status 1\)"):
        Runner(exp).run([report_step(exp, config)])
    assert "FileNotFoundError" in caplog.text
    assert record(exp)["status"] == "started" and not (exp / "results.md").exists()


def test_in_process_step_must_name_a_module(tmp_path):
    step = Step("odd", ("report.py",), tmp_path, ("x",), in_process=True)
    with pytest.raises(ValueError, match="must be `-m module ...`"):
        Runner(tmp_path).run([step])
