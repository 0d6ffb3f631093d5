"""Helpers of the workflow tests: run/configs/test.yaml redirected into a temporary folder."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "run" / "configs" / "test.yaml"


def experiment_data(tmp_path: Path, **changes) -> dict:
    """test.yaml's content with output.root under tmp_path and `changes` merged in by section."""
    data = yaml.safe_load(TEST_CONFIG.read_text())
    data["output"]["root"] = str(tmp_path / "runs")
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return data


def write_config(tmp_path: Path, data: dict, name: str = "experiment.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path
