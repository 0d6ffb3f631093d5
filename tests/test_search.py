"""The search end to end: outputs, reproducibility, resume after a real kill -9, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rl_quantize
from lib.search import KILL_ENV, DDPGConfig, prepare, run_search
from lib.search.search import Search
from lib.training import load_checkpoint
from search_support import make_int8_checkpoint, tiny_config

REPO = Path(__file__).resolve().parent.parent
SMALL_AGENT = DDPGConfig(hidden1=16, hidden2=16, bsize=8)


@pytest.fixture(scope="session")
def int8_ckpt(tmp_path_factory) -> Path:
    return make_int8_checkpoint(tmp_path_factory.mktemp("int8_tiny"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def test_search_writes_every_output(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "search"
    result = run_search(tiny_config(int8_ckpt, out, ddpg=SMALL_AGENT))
    for name in ("best_policy.npy", "best_policy.json", "episodes.jsonl", "summary.json", "search_state.pth"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    records = read_log(out)
    assert [r["episode"] for r in records] == [0, 1, 2]
    for r in records:
        assert set(r) >= {"episode", "policy", "accuracy", "latency_ratio", "reward", "feasible", "seconds", "strategy"}
        assert set(r["seconds"]) == {"finetune", "eval", "rest"}
        assert np.asarray(r["policy"]).shape == (4, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes_run"] == 3
    assert summary["target_accuracy"] == pytest.approx(summary["baseline_accuracy"] - 1.0)
    assert summary["config"]["episodes"] == 3
    best = np.load(out / "best_policy.npy")
    assert best.dtype.kind == "i" and best.tolist() == summary["best"]["policy"] == result.best["policy"]
    policy_json = json.loads((out / "best_policy.json").read_text())
    assert [layer["name"] for layer in policy_json["layers"]] == ["features.0", "features.3", "features.6", "fc"]
    assert policy_json["latency_ratio"] == pytest.approx(result.best["latency_ratio"])
    assert load_checkpoint(int8_ckpt)["args"]["arch"] == "tiny_cnn"


def test_same_seed_same_policies_and_random_strategy(int8_ckpt, tmp_path, eager_single_thread):
    first = run_search(tiny_config(int8_ckpt, tmp_path / "a", ddpg=SMALL_AGENT, episodes=4, top_k=0))
    second = run_search(tiny_config(int8_ckpt, tmp_path / "b", ddpg=SMALL_AGENT, episodes=4, top_k=0))
    assert [r["policy"] for r in read_log(tmp_path / "a")] == [r["policy"] for r in read_log(tmp_path / "b")]
    assert first.best == second.best
    other = run_search(tiny_config(int8_ckpt, tmp_path / "c", ddpg=SMALL_AGENT, episodes=4, top_k=0, seed=1))
    assert [r["policy"] for r in read_log(tmp_path / "c")] != [r["policy"] for r in read_log(tmp_path / "a")]
    assert other.episodes_run == 4
    run_search(tiny_config(int8_ckpt, tmp_path / "r", strategy="random", episodes=2, top_k=0))
    assert [r["strategy"] for r in read_log(tmp_path / "r")] == ["random", "random"]


def cli_args(init: Path, out: Path, episodes: int) -> list[str]:
    return ["--init", str(init), "--output-dir", str(out), "--episodes", str(episodes), "--warmup", "1",
            "--finetune-steps", "2", "--batch-size", "16", "--search-holdout", "32", "--search-train-size", "128",
            "--top-k", "0", "--calibration-batches", "1", "--hidden1", "16", "--hidden2", "16", "--bsize", "8",
            "--threads", "1", "--no-progress", "--device", "cpu", "--seed", "3"]


def test_resume_after_kill_continues_identically(int8_ckpt, tmp_path, eager_single_thread):
    reference = tmp_path / "straight"
    assert rl_quantize.main(cli_args(int8_ckpt, reference, 5)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "2", "CIM_AQ_COMPILE": "0"}
    killed = subprocess.run([sys.executable, "rl_quantize.py", *cli_args(int8_ckpt, out, 5)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["episode"] for r in read_log(out)] == [0, 1]
    env.pop(KILL_ENV)
    resumed = subprocess.run([sys.executable, "rl_quantize.py", *cli_args(int8_ckpt, out, 5), "--resume", "auto"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the search after episode 2" in resumed.stderr
    got, want = read_log(out), read_log(reference)
    assert [r["episode"] for r in got] == [0, 1, 2, 3, 4]
    assert [r["policy"] for r in got] == [r["policy"] for r in want]
    assert [r["accuracy"] for r in got] == pytest.approx([r["accuracy"] for r in want])
    # the same command without --resume refuses to mix with the finished search
    assert rl_quantize.main(cli_args(int8_ckpt, out, 5)) == 2


def test_cim_aq_spellings_are_accepted(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "aliases"
    args = ["--init", str(int8_ckpt), "--output-dir", str(out), "--train_episode", "1", "--warmup", "1",
            "--acc_drop", "2.5", "--min_bit", "3", "--max_bit", "6", "--finetune_lr", "0.002",
            "--finetune_steps", "1", "--batch_size", "16", "--search_holdout", "32", "--top_k", "0",
            "--no-progress", "--threads", "1", "--device", "cpu"]
    assert rl_quantize.main(args) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["episodes"], config["max_accuracy_drop"], config["min_bit"], config["max_bit"],
            config["finetune_lr"]) == (1, 2.5, 3, 6, 0.002)
    assert np.all((np.load(out / "best_policy.npy") >= 3) & (np.load(out / "best_policy.npy") <= 6))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, int8_ckpt) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    foreign = folder / "foreign.pth"
    torch.save({"weight": torch.zeros(2)}, foreign)
    corrupt = folder / "corrupt.pth.tar"
    corrupt.write_bytes(int8_ckpt.read_bytes()[:300])
    fp32 = make_int8_checkpoint(folder / "fp32", quant="none")
    return {"foreign": foreign, "corrupt": corrupt, "fp32": fp32}


@pytest.mark.parametrize("extra, message", [
    (["--min-bit", "6", "--max-bit", "4"], "min_bit=6 > max_bit=4"),
    (["--max-bit", "17"], "max_bit=17 is not allowed: the CIM layers support bits in [1, 16]"),
    (["--min-bit", "0"], "min_bit=0 is not allowed"),
    (["--search-adc", "--max-adc-bit", "30"], "max_adc_bit=30 is not allowed"),
    (["--min-bit", "2", "--max-bit", "3", "--cell-resolution-constraint"], "cell_bits=4 > max_bit=3"),
    (["--arch", "resnet20"], "does not match the --init checkpoint's arch='tiny_cnn'"),
    (["--layer-dims", str(REPO / "run" / "layer_dims" / "resnet18_224.yaml")], "has 4 quantizable layers"),
    (["--latency-budget", "0.001"], "latency_budget=0.001 is not reachable"),
    (["--episodes", "0"], "episodes=0 is not allowed"),
    (["--eval-noise", "flash"], "eval_noise='flash' is not allowed"),
    (["--eval-repeats", "3"], "eval_repeats=3 needs eval_noise"),
])
def test_bad_settings_exit_2_before_training(int8_ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert rl_quantize.main(cli_args(int8_ckpt, out, 2) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (out / "episodes.jsonl").exists()


@pytest.mark.parametrize("which, message", [
    ("missing", "does not exist"), ("foreign", "is not a cim-aq checkpoint"),
    ("corrupt", "cannot be read"), ("fp32", "holds an FP32 model"),
])
def test_bad_checkpoints_exit_2(bad_files, tmp_path, capsys, which, message):
    path = bad_files.get(which, tmp_path / "nowhere.pth.tar")
    assert rl_quantize.main(cli_args(path, tmp_path / "out", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_an_earlier_search_is_kept_unless_overwrite_and_until_everything_checks_out(int8_ckpt, tmp_path, capsys):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "episodes.jsonl").write_text('{"episode": 0}\n')
    assert rl_quantize.main(cli_args(int8_ckpt, out, 2)) == 2
    assert "already holds a search (episodes.jsonl); use --resume auto" in capsys.readouterr().err
    assert rl_quantize.main(cli_args(int8_ckpt, out, 2) + ["--overwrite", "--search-holdout", "100000"]) == 2
    assert "holdout size=100000 leaves no training images" in capsys.readouterr().err
    assert (out / "episodes.jsonl").read_text() == '{"episode": 0}\n'


def test_adc_search_writes_three_columns(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "adc"
    result = run_search(tiny_config(int8_ckpt, out, search_adc=True, min_adc_bit=4, max_adc_bit=6, episodes=2,
                                    top_k=1, ddpg=SMALL_AGENT))
    best = np.load(out / "best_policy.npy")
    assert best.shape == (4, 3) and best.tolist() == result.best["policy"]
    assert np.all((best[:, 2] >= 4) & (best[:, 2] <= 6))
    assert all(len(row) == 3 for r in read_log(out) for row in r["policy"])
    assert [layer["adc_bits"] for layer in json.loads((out / "best_policy.json").read_text())["layers"]] == \
        best[:, 2].tolist()



def test_search_on_other_hardware_starts_from_the_same_model_every_run(int8_ckpt, tmp_path, eager_single_thread):
    config = tiny_config(int8_ckpt, tmp_path, hardware=str(REPO / "run" / "hardware" / "cell2bit.yaml"))
    starts = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever ran before in the process
        search = Search(config, prepare(config), None)
        evaluator = search.build_evaluator()
        starts.append(evaluator.start_state)
        assert evaluator.model.get_submodule("fc").hw.cell_bits == 2
    assert starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_search_under_eval_noise_scores_every_policy_on_the_noisy_device(int8_ckpt, tmp_path, eager_single_thread):
    """--eval-noise: the baseline and every policy are the mean over seeded programmings of the
    cells, the same for the same seed, and the summary says which noise the accuracies are under."""
    ideal = run_search(tiny_config(int8_ckpt, tmp_path / "ideal", ddpg=SMALL_AGENT, episodes=2, top_k=0))
    noisy = run_search(tiny_config(int8_ckpt, tmp_path / "noisy", ddpg=SMALL_AGENT, episodes=2, top_k=0,
                                   eval_noise="rram", eval_repeats=2))
    again = run_search(tiny_config(int8_ckpt, tmp_path / "again", ddpg=SMALL_AGENT, episodes=2, top_k=0,
                                   eval_noise="rram", eval_repeats=2))
    assert [r["accuracy"] for r in read_log(tmp_path / "noisy")] == [r["accuracy"] for r in read_log(tmp_path / "again")]
    assert noisy.baseline_accuracy != ideal.baseline_accuracy
    summary = json.loads((tmp_path / "noisy" / "summary.json").read_text())
    assert summary["accuracy_noise"] == "rram, mean of 2 programming(s)"
    assert json.loads((tmp_path / "ideal" / "summary.json").read_text())["accuracy_noise"] == "ideal"
