"""python -m lib.crossbar_eval: a sweep of a tiny model writes every output, resumes after a real
SIGKILL with identical rows, extends with only the new points, and refuses bad input up front."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_fp32 import fp32  # noqa: F401  (the module's start checkpoint fixture)
from lib.crossbar_eval.cli import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["--w-bit", "4", "--a-bit", "4", "--batch-size", "128", "--calibration-batches", "1", "--threads", "1",
         "--no-progress", "--sweep", "cell_bits=1,2", "adc_bits=4:5", "--noise", "prog=0,0.05", "--repeats", "2"]

pytestmark = pytest.mark.usefixtures("eager_single_thread")


def _rows(folder: Path) -> list[dict]:
    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _command(fp32: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "lib.crossbar_eval", "--checkpoint", str(fp32), "--output-dir", str(out),
            *SWEEP, *extra]


def test_sweep_writes_all_outputs_and_resumes_after_sigkill_with_identical_rows(fp32, tmp_path):
    env = {**os.environ, "CIM_AQ_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    done = subprocess.run(_command(fp32, whole), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png"):
        assert (whole / name).stat().st_size > 0
    rows = _rows(whole)
    assert len(rows) == 8
    header = (whole / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["cell_bits", "adc_bits", "prog"] and "top1_mean" in header and "top1_std" in header
    noisy = [r for r in rows if r["prog"] == 0.05]
    assert all(r["repeats"] == 2 and r["noise"] == "prog=0.05" for r in noisy)
    assert all(r["repeats"] == 1 and r["noise"] == "ideal" and r["top1_std"] == 0 for r in rows if r["prog"] == 0)
    assert "prog=0.05" in (whole / "sweep.md").read_text()
    assert all(r["energy_pj"] > 0 and r["arrays"] > 0 and 0 < r["latency_ratio"] for r in rows)  # default.yaml prices energy

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(fp32, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = killed / "sweep.json"
        if path.exists() and len(json.loads(path.read_text())["rows"]) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(_rows(killed))
    assert 2 <= partial < 8, "the sweep must be killed part-way"
    resumed = subprocess.run(_command(fp32, killed, "--resume", "auto"), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["reused"] == partial and summary["computed"] == 8 - partial
    assert sorted(_rows(killed), key=lambda r: r["key"]) == sorted(rows, key=lambda r: r["key"])


def test_more_points_compute_only_the_new_ones_and_bad_input_exits_2_before_evaluating(fp32, tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["--checkpoint", str(fp32), "--output-dir", str(out), "--w-bit", "4", "--a-bit", "4", "--batch-size",
            "128", "--calibration-batches", "1", "--no-progress"]
    assert sweep_main(base + ["--sweep", "adc_bits=4,5"]) == 0
    first = {r["key"]: r for r in _rows(out)}
    capsys.readouterr()
    assert sweep_main(base + ["--sweep", "adc_bits=4:6", "--resume", "auto"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["computed"], summary["reused"]) == (1, 2)
    assert all(_rows(out)[i] == first[_rows(out)[i]["key"]] for i in range(2))
    assert sweep_main(base + ["--sweep", "adc_bits=4"]) == 2  # a sweep already there, no --resume auto
    assert "already holds a sweep" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    bad = [(["--sweep", "cell_size=2"], "cell_size"), (["--sweep", "cell_bits=2,9"], "cell_bits=9"),
           (["--sweep", "mapping=offset", "slice_significance=equal"], "slice_significance"),
           (["--noise", "prog=-0.1"], "prog=-0.1"), (["--noise", "glow=1"], "glow"),
           (["--sweep", "adc_bits=8:3"], "empty"), (["--arch", "resnet20"], "tiny_cnn")]
    for flags, named in bad:
        argv = ["--checkpoint", str(fp32), "--output-dir", str(fresh), "--w-bit", "4", "--a-bit", "4", *flags]
        assert sweep_main(argv) == 2, flags
        assert named in capsys.readouterr().err, flags
        assert not (fresh / "sweep.json").exists()
    assert sweep_main(["--checkpoint", str(fp32), "--output-dir", str(fresh)]) == 2
    assert "FP32 checkpoint" in capsys.readouterr().err
