"""The two-stage workflow end to end on run/configs/test.yaml: real steps, real subprocesses.

One experiment is run once per module; the later tests rerun it (skip everything), delete one
output (that step and what depends on it rerun), and kill a search mid-way (it resumes).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.workflow.config import load_config
from lib.workflow.steps import build_plan
from workflow_support import REPO, experiment_data, write_config


def run_workflow(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIM_AQ_COMPILE": "0"}
    return subprocess.run([sys.executable, "-m", "lib.workflow", str(config), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True)


def step_states(output: str) -> dict[str, str]:
    """step name → skipped | running | resumed, from the workflow's progress lines."""
    return dict(re.findall(r"\] (\S+)\s+(skipped|running|resumed)\b", output))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workflow")
    config = write_config(tmp_path, experiment_data(tmp_path))
    result = run_workflow(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, load_config(config).experiment_dir, result


def test_test_config_runs_both_stages_end_to_end(experiment):
    config, exp, result = experiment
    plan = build_plan(load_config(config))
    assert step_states(result.stderr) == {step.name: "running" for step in plan}
    results = json.loads((exp / "results.json").read_text())
    assert set(results["stages"]) == {"stage1", "stage2"}
    search_policy = json.loads((exp / "stage1_digits-small" / "search" / "best_policy.json").read_text())
    for stage in results["stages"].values():
        assert stage["latency_ratio"] == pytest.approx(1 / stage["speedup"])
        assert isinstance(stage["accuracy_constraint_met"], bool)
        assert stage["accuracy_constraint_met"] == (
            stage["mixed_test_top1"] >= stage["int8_test_top1"] - stage["max_accuracy_drop"])
        assert [(row["layer"], row["w_bit"], row["a_bit"]) for row in stage["policy"]] == [
            (layer["name"], layer["w_bit"], layer["a_bit"]) for layer in search_policy["layers"]]
        assert sum(row["latency_share"] for row in stage["policy"]) == pytest.approx(1.0)
        assert sum(row["energy_share"] for row in stage["policy"]) == pytest.approx(1.0)  # default.yaml: energy
        assert stage["ratios"]["energy"] == pytest.approx(stage["energy"]["energy_ratio"])
        assert Path(stage["onnx"]).is_file() and stage["ort_top1_agreement"] >= 0.99
    assert set(results["step_seconds"]) == {step.name for step in plan if step.name != "report"}
    markdown = (exp / "results.md").read_text()
    assert "Stage 1 (search)" in markdown and "Stage 2 (large dataset)" in markdown and "row-tiles" in markdown
    assert "energy ratio vs uniform 8-bit" in markdown and "share of energy" in markdown
    assert "- search strategy: **ddpg** in " in markdown
    for figure in ("pareto.png", "search.png"):
        assert (exp / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_skips_every_step(experiment):
    config, exp, _ = experiment
    result = run_workflow(config)
    assert result.returncode == 0, result.stderr[-3000:]
    states = step_states(result.stderr)
    assert set(states.values()) == {"skipped"} and len(states) == len(build_plan(load_config(config)))


def test_deleting_one_output_reruns_that_step_and_what_depends_on_it(experiment):
    config, exp, _ = experiment
    (exp / "stage2_digits" / "export" / "model.onnx").unlink()
    result = run_workflow(config)
    assert result.returncode == 0, result.stderr[-3000:]
    rerun = {name for name, state in step_states(result.stderr).items() if state != "skipped"}
    assert rerun == {"stage2/export", "stage2/evaluate", "report"}
    assert (exp / "stage2_digits" / "export" / "model.onnx").is_file()


def test_interrupted_search_resumes(experiment, tmp_path):
    """More episodes change the search step; killed after two of them, a rerun resumes it."""
    config, exp, _ = experiment
    data = json.loads(json.dumps(experiment_data(Path(config).parent)))
    data["training"]["rl"]["train_episodes"] = 5
    longer = write_config(Path(config).parent, data, "longer.yaml")
    episodes = exp / "stage1_digits-small" / "search" / "episodes.jsonl"
    record = exp / ".workflow" / "stage1__search.json"
    env = {**os.environ, "CIM_AQ_COMPILE": "0"}
    process = subprocess.Popen([sys.executable, "-m", "lib.workflow", str(longer), "--until", "stage1/search"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            started = record.is_file() and json.loads(record.read_text())["status"] == "started"
            if started and episodes.is_file() and len(episodes.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = len(episodes.read_text().splitlines())
    assert 2 <= done_before < 5, "the search was not interrupted mid-way"
    result = run_workflow(longer, "--until", "stage1/search")
    assert result.returncode == 0, result.stderr[-3000:]
    states = step_states(result.stderr)
    assert states["stage1/search"] == "resumed"
    assert states["stage1/fp32"] == states["stage1/int8"] == "skipped"
    assert [json.loads(line)["episode"] for line in episodes.read_text().splitlines()] == list(range(5))
