"""Runs under torchrun (CPU, Gloo, 2 processes): disjoint data shards, rank-0-only files, all-reduced
metrics equal to one process evaluating the checkpoint, resume, finetune with export, a search whose
policies repeat with the same seed, and CIM layers whose learned steps, ADC statistics and bits stay
identical across ranks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
from lib.distributed import DistContext, DistributedSetupError, check_sync_bn, torchrun_command
from lib.training import load_checkpoint
from lib.workflow.config import load_config
from lib.workflow.runner import Runner
from lib.workflow.steps import Step, build_plan
from search_support import make_int8_checkpoint
from workflow_support import experiment_data, write_config

REPO = Path(__file__).resolve().parents[1]
DATA = ["--dataset", "digits-small", "--input-size", "16", "--batch-size", "16", "--workers", "0", "--threads", "1",
        "--max-batches", "2", "--seed", "3", "--no-progress", "--device", "cpu"]
TINY = ["--arch", "tiny_cnn"]

# A training process of our own under torchrun: records its data shards and its CIM model's state
# after per-rank calibration and after fit, for each ADC granularity given on the command line
# ('column' clips partial sums to running statistics, so the ADC keeps statistics per rank).
PROBE = '''
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lib import cli
from lib.cim import HardwareConfig, current_policy, quantize_model, quantizable_layers
from lib.data import build_loaders
from lib.policy import Policy
from lib.training import OptimConfig, fit, seed_epoch, seed_everything
from models import create_model

out = Path(sys.argv[1])
torch.set_num_threads(1)
ctx = cli.init_context("cpu")
data = build_loaders("digits-small", None, 16, batch_size=16, workers=0, seed=3, dist=ctx)
record = {"shards": {}}
for epoch in (0, 1):
    seed_epoch(3, epoch, data.train, ctx.rank)
    record["shards"][f"train{epoch}"] = list(data.train.sampler)
record["shards"]["val"] = list(data.val.sampler)
for granularity in sys.argv[2:]:
    seed_everything(0)
    hw = replace(HardwareConfig.from_yaml("run/hardware/cim_aq_default.yaml"), psum_granularity=granularity,
                 n_sigma=3.0 if granularity != "off" else None)
    model = quantize_model(create_model("tiny_cnn", 10), Policy([8, 4, 3, 6], [8, 6, 5, 8], [8, 6, 6, 8]), hw,
                           input_size=16, calibration_data=data.train, calibration_batches=1)
    calibrated = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, data.train, data.val, OptimConfig(epochs=1, lr=0.05), out / granularity, device=ctx.device, seed=3,
        max_batches=2, progress=False, dist=ctx)
    mirrors = [(layer.w_bit, layer.a_bit, layer.adc_bits, layer.psum_adc.initialized)
               for _, layer in quantizable_layers(model)]
    record[granularity] = {"calibrated": calibrated, "trained": model.state_dict(), "mirrors": mirrors,
                           "policy": current_policy(model).to_json_dict()}
torch.save(record, out / f"rank{ctx.rank}.pt")
'''


def torchrun(script: str | Path, args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc script args` from the repository root; fails the test on a non-zero exit."""
    env = {**os.environ, "CIM_AQ_COMPILE": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(torchrun_command(script, args, nproc), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> list[dict]:
    """Both ranks' records of the probe run (ADC on per column, and ADC off)."""
    out = tmp_path_factory.mktemp("probe")
    script = out / "probe.py"
    script.write_text(PROBE)
    torchrun(script, [out, "column", "off"])
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """An FP32 tiny_cnn trained one epoch by two processes."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    torchrun(REPO / "pretrain.py", DATA + TINY + ["--epochs", "1", "--lr", "0.05", "--output-dir", out])
    return out


def test_ranks_read_disjoint_shards_of_one_permutation_per_epoch(probe):
    for split, size in (("train0", 500), ("train1", 500), ("val", 200)):
        first, second = probe[0]["shards"][split], probe[1]["shards"][split]
        assert len(first) == len(second) == size // 2
        assert not set(first) & set(second) and sorted(first + second) == list(range(size))
    assert probe[0]["shards"]["train0"] != probe[0]["shards"]["train1"]  # reshuffled per epoch


@pytest.mark.parametrize("granularity", ["column", "off"])
def test_cim_layers_hold_identical_state_on_every_rank(probe, granularity):
    ranks = [record[granularity] for record in probe]
    calibrated_apart = [k for k, v in ranks[0]["calibrated"].items() if not torch.equal(v, ranks[1]["calibrated"][k])]
    assert any(k.endswith("step") for k in calibrated_apart)  # each rank calibrated on its own shard
    if granularity != "off":
        assert any(k.endswith("psum_adc.running_mean") for k in calibrated_apart)
    trained = ranks[0]["trained"]
    assert set(trained) == set(ranks[1]["trained"])
    kinds = ("weight", "psum_adc.step", "weight_quant.tensor_quant.scaling_impl.step", "running_abs_mean", "bits",
             "running_mean", "running_var")
    for kind in kinds:
        assert any(k.endswith(kind) for k in trained), kind
    differing = [k for k, v in trained.items() if not torch.equal(v, ranks[1]["trained"][k])]
    assert differing == []
    assert not any(k.startswith("module.") for k in trained)
    assert ranks[0]["mirrors"] == ranks[1]["mirrors"] and ranks[0]["policy"] == ranks[1]["policy"]
    assert [bits[:3] for bits in ranks[0]["mirrors"]] == [(8, 8, 8), (4, 6, 6), (3, 5, 6), (6, 8, 8)]


def test_rank_zero_writes_one_run_whose_checkpoint_scores_the_reported_accuracy(pretrained):
    assert sorted(p.name for p in pretrained.iterdir()) == ["args.json", "checkpoint.pth.tar", "metrics.json",
                                                            "model_best.pth.tar", "tb"]
    assert len(list((pretrained / "tb").iterdir())) == 1  # one TensorBoard writer
    reported = json.loads((pretrained / "metrics.json").read_text())
    assert reported["processes"] == 2 and reported["last"]["samples"] == 200  # every val image once
    state = load_checkpoint(pretrained / "checkpoint.pth.tar")
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["state_dict"])
    # one process evaluating the checkpoint gets what the two processes reported
    assert pretrain.main(["--evaluate", "--resume", str(pretrained / "checkpoint.pth.tar"), "--workers", "0",
                          "--no-progress", "--device", "cpu"]) == 0
    single = json.loads((pretrained / "eval_metrics.json").read_text())["val"]
    assert single["samples"] == 200
    assert single["top1"] == reported["last"]["top1"] and single["top5"] == reported["last"]["top5"]
    assert single["loss"] == pytest.approx(reported["last"]["loss"], rel=1e-6)


def test_resume_under_torchrun_continues_the_epoch_count(pretrained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", "checkpoint.pth.tar", "model_best.pth.tar", "metrics.json"):
        (run / name).write_bytes((pretrained / name).read_bytes())
    first = load_checkpoint(run / "checkpoint.pth.tar")
    torchrun(REPO / "pretrain.py", DATA + ["--epochs", "2", "--lr", "0.05", "--resume", "auto", "--output-dir", run,
                                           "--no-tensorboard"])
    resumed = load_checkpoint(run / "checkpoint.pth.tar")
    assert resumed["epoch"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == first["history"][0]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1


def test_finetune_under_torchrun_reports_exports_once_and_checkpoint_loads_in_one_process(pretrained, tmp_path):
    policy = tmp_path / "policy.npy"
    np.save(policy, np.array([[8, 8], [4, 6], [3, 5], [6, 8]]))
    out = tmp_path / "mixed"
    torchrun(REPO / "finetune.py", DATA + ["--policy", policy, "--init", pretrained / "model_best.pth.tar",
                                           "--epochs", "1", "--lr", "0.01", "--export-images", "32",
                                           "--min-agreement", "0.9", "--output-dir", out])
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["test_samples"] == 200 and (out / "model.onnx").is_file()
    assert report["ort_top1_agreement"] >= 0.9
    from lib.export.checkpoint_model import model_from_checkpoint

    model, state = model_from_checkpoint(out / "model_best.pth.tar")
    assert not any(k.startswith("module.") for k in state["state_dict"])
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".tmp") == [
        "args.json", "checkpoint.pth.tar", "model.onnx", "model_best.pth.tar", "policy.json", "policy.npy",
        "report.json", "tb"]


def test_sync_bn_is_refused_for_processes_on_cpus_before_any_work():
    check_sync_bn(True, DistContext(world_size=1))  # one process: nothing to synchronise, allowed
    check_sync_bn(True, DistContext(rank=1, world_size=2, device=torch.device("cuda", 1)))
    with pytest.raises(DistributedSetupError, match="--sync-bn needs CUDA devices"):
        check_sync_bn(True, DistContext(rank=1, world_size=2))


# A search process of our own under torchrun: the search of rl_quantize.py's flags, run as
# run_search runs it, then each rank records the CIM model it holds after the last episode.
SEARCH_PROBE = '''
import sys
from pathlib import Path

import torch

import rl_quantize
from lib import cli
from lib.cim import quantizable_layers
from lib.run_dir import open_run_dir
from lib.search import prepare
from lib.search.search import Search

args = rl_quantize.parse_args(sys.argv[1:])
torch.set_num_threads(1)
config = rl_quantize.config_from_args(args)
ctx = cli.init_context(args.device)
search = Search(config, prepare(config), None, ctx)
search.evaluator = search.build_evaluator()
if ctx.is_main:
    open_run_dir(config.output_dir)
search.run(progress=False)
model = search.evaluator.model
mirrors = [(layer.w_bit, layer.a_bit, layer.adc_bits, layer.psum_adc.initialized)
           for _, layer in quantizable_layers(model)]
torch.save({"state": model.state_dict(), "mirrors": mirrors, "records": search.records},
           Path(config.output_dir).parent / f"search_rank{ctx.rank}.pt")
'''


def read_episodes(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def test_search_under_torchrun_repeats_its_policies_and_keeps_ranks_identical(tmp_path, eager_single_thread):
    init = make_int8_checkpoint(tmp_path / "int8")
    flags = ["--init", init, "--episodes", "2", "--warmup", "1", "--finetune-steps", "2", "--batch-size", "16",
             "--search-holdout", "64", "--search-train-size", "128", "--top-k", "0", "--calibration-batches", "1",
             "--hidden1", "16", "--hidden2", "16", "--bsize", "8", "--threads", "1", "--no-progress",
             "--device", "cpu", "--seed", "3"]
    script = tmp_path / "search_probe.py"
    script.write_text(SEARCH_PROBE)
    torchrun(script, flags + ["--output-dir", tmp_path / "first"])
    done = torchrun(REPO / "rl_quantize.py", flags + ["--output-dir", tmp_path / "again"])
    first, again = read_episodes(tmp_path / "first"), read_episodes(tmp_path / "again")
    assert [r["episode"] for r in first] == [0, 1]
    assert [r["policy"] for r in first] == [r["policy"] for r in again]
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in again]
    assert json.loads(done.stdout.strip().splitlines()[-1])["output_dir"] == str(tmp_path / "again")  # printed once
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 1
    assert (tmp_path / "again" / "search_state.pth").is_file() and len(list((tmp_path / "again" / "tb").iterdir())) == 1

    ranks = [torch.load(tmp_path / f"search_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in rank["records"]] for rank in ranks]
    assert untimed[0] == untimed[1]  # every rank saw the same policies, accuracies and rewards
    assert ranks[0]["mirrors"] == ranks[1]["mirrors"]
    assert [bits[:2] for bits in ranks[0]["mirrors"]] == [tuple(row[:2]) for row in first[-1]["policy"]]
    state = ranks[0]["state"]
    for kind in ("weight", "psum_adc.step", "running_abs_mean", "bits", "running_mean", "running_var"):
        assert any(k.endswith(kind) for k in state), kind
    assert [k for k, v in state.items() if not torch.equal(v, ranks[1]["state"][k])] == []


def test_workflow_runs_training_and_search_steps_in_nproc_per_node_processes(tmp_path):
    config = load_config(write_config(tmp_path, experiment_data(tmp_path, device={"nproc_per_node": 2})))
    processes = {step.name: step.processes for step in build_plan(config)}
    assert {name for name, count in processes.items() if count == 2} == {
        f"{stage}/{step}" for stage in ("stage1", "stage2") for step in ("fp32", "int8", "finetune")} | {"stage1/search"}
    assert processes["stage1/export"] == processes["report"] == 1

    script = tmp_path / "ranks.py"  # a step that records which processes ran it
    script.write_text("import os, pathlib, sys\npathlib.Path(sys.argv[1], 'rank' + os.environ['RANK']).write_text("
                      "os.environ['WORLD_SIZE'])\n")
    work = tmp_path / "work"
    step = Step("ranks", (str(script), str(work)), work, ("rank0", "rank1"), processes=2)
    runner = Runner(tmp_path / "experiment")
    assert runner.command(step)[0].endswith("torchrun")
    assert [outcome.state for outcome in runner.run([step])] == ["running"]
    assert [(work / f"rank{rank}").read_text() for rank in (0, 1)] == ["2", "2"]
    single = Step("ranks", step.argv, work, step.outputs)
    assert runner.fingerprint(single, set()) != runner.fingerprint(step, set())
