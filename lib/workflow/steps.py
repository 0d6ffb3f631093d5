"""The workflow as a list of steps: each a stage CLI's argv with declared inputs, outputs and config.

Stage 1 (small dataset): fp32 → int8 → search → finetune → export → evaluate.
Stage 2 (large dataset, when enabled): fp32 → int8 → finetune (stage 1's policy) → export → evaluate.
Then one report step over both. Every step writes into its own folder of the experiment dir.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lib.cim.runtime import environment_variable
from lib.workflow.config import REPO_ROOT, ResolvedConfig

HARDWARE_FILE = "hardware.yaml"


@dataclass(frozen=True)
class Step:
    """One unit of work: `argv` (after the Python interpreter) run from the repository root.

    outputs: files (relative to `workdir`) whose presence marks the step done.
    inputs: files the step reads (another step's outputs or the user's); their contents count
        in the fingerprint, as do `settings` (the config values the step uses) and the argv.
    runtime_args: flags that change speed or display, not results (threads, workers, progress).
    resumable: the CLI continues an interrupted run from its checkpoint (`--resume auto`).
    processes: how many processes run the step (torchrun when > 1: pretrain, finetune and the
        search; `--batch-size` is per process, so it is part of the fingerprint).
    owns_workdir: the folder is the step's alone, emptied before each fresh run (stage CLIs refuse to
        write over an earlier run's files); false for the report, which writes into the experiment dir.
    in_process: a light `-m module` step (evaluation, report) the runner calls as `module.main(argv)` in its
        own process: it has torch and the config imported already, a fresh interpreter would spend
        seconds importing them again.
    """

    name: str
    argv: tuple[str, ...]
    workdir: Path
    outputs: tuple[str, ...]
    inputs: tuple[Path, ...] = ()
    depends: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    runtime_args: tuple[str, ...] = ()
    resumable: bool = False
    owns_workdir: bool = True
    in_process: bool = False
    processes: int = 1

    def output_paths(self) -> list[Path]:
        return [self.workdir / name for name in self.outputs]


@dataclass(frozen=True)
class StageData:
    """Which dataset a stage trains on and its budgets."""

    label: str
    name: str
    kind: str
    root: Optional[Path]
    fp32_epochs: int
    int8_epochs: int
    final_epochs: int
    fp32_lr: float
    int8_lr: float
    final_lr: float
    fp32_start: Optional[Path] = None


def step_environment(config: ResolvedConfig) -> dict[str, str]:
    """Environment variables every step gets from the config: the GPU to use, kernel compilation and
    the gradient-product format."""
    device = config.raw.device
    env = {}
    if device.gpu_id is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device.gpu_id)
    if device.compile_kernels is not None:
        env[environment_variable("compile")] = "1" if device.compile_kernels else "0"
    if device.gradient_products is not None:
        env[environment_variable("gradient_products")] = device.gradient_products
    return env


def stage_dirs(config: ResolvedConfig) -> dict[str, Path]:
    """stage label → its folder in the experiment dir."""
    raw = config.raw
    dirs = {"stage1": config.experiment_dir / f"stage1_{raw.datasets.small.name}"}
    if config.stage2_enabled:
        dirs["stage2"] = config.experiment_dir / f"stage2_{raw.datasets.large.name}"
    return dirs


def build_plan(config: ResolvedConfig) -> list[Step]:
    """Every step of the experiment in execution order (dependencies come first)."""
    raw = config.raw
    lr, tr = raw.training.learning_rates, raw.training
    stages = [StageData("stage1", raw.datasets.small.name, config.small_kind, config.small_root,
                        tr.small_dataset.fp32_epochs, tr.small_dataset.int8_epochs,
                        tr.small_dataset.final_finetune_epochs, lr.small_dataset.fp32_pretraining,
                        lr.small_dataset.int8_pretraining, lr.small_dataset.mixed_precision_finetuning)]
    if config.stage2_enabled:
        stages.append(StageData("stage2", raw.datasets.large.name, config.large_kind, config.large_root,
                                tr.large_dataset.fp32_epochs, tr.large_dataset.int8_epochs,
                                tr.large_dataset.final_finetune_epochs, lr.large_dataset.fp32_pretraining,
                                lr.large_dataset.int8_pretraining, lr.large_dataset.mixed_precision_finetuning,
                                _stage1_fp32(config) if tr.large_dataset.fp32_from_stage1 else None))
    dirs = stage_dirs(config)
    hardware = config.experiment_dir / HARDWARE_FILE
    plan: list[Step] = []
    policy: Optional[Path] = None
    for stage in stages:
        base = dirs[stage.label]
        steps = _training_steps(config, stage, base, hardware)
        if stage.label == "stage1":
            search = _search_step(config, stage, base, hardware)
            steps.append(search)
            policy = search.workdir / "best_policy.json"
        steps += _final_steps(config, stage, base, hardware, policy)
        plan += steps
    plan.append(_report_step(config, plan))
    return plan


# ------------------------------------------------------------------------------------------ pieces
def _stage1_fp32(config: ResolvedConfig) -> Path:
    return stage_dirs(config)["stage1"] / "fp32" / "model_best.pth.tar"


def _data_args(config: ResolvedConfig, stage: StageData) -> list[str]:
    args = ["--dataset", stage.kind, "--input-size", str(config.input_size)]
    if stage.root is not None:
        args += ["--data-root", str(stage.root)]
    return args


def _runtime_args(config: ResolvedConfig, progress_flag: bool = True, workers: bool = True) -> tuple[str, ...]:
    raw = config.raw
    args = ["--threads", str(raw.device.threads), "--device", raw.device.device]
    if workers:
        args += ["--workers", str(raw.dataloader.num_workers)]
    if progress_flag and not raw.logging.progress:
        args.append("--no-progress")
    return tuple(args)


def _training_args(config: ResolvedConfig) -> list[str]:
    raw = config.raw
    args = ["--batch-size", str(raw.dataloader.batch_size), "--seed", str(raw.seed)]
    if raw.logging.wandb.enable:
        args += ["--wandb", raw.logging.wandb.project]
    return args


def _training_steps(config: ResolvedConfig, stage: StageData, base: Path, hardware: Path) -> list[Step]:
    common = _data_args(config, stage) + _training_args(config) + ["--arch", config.arch, "--resume", "auto"]
    runtime = _runtime_args(config)
    fp32_dir, int8_dir = base / "fp32", base / "int8"
    fp32_argv = ["pretrain.py", *common, "--epochs", str(stage.fp32_epochs), "--lr", str(stage.fp32_lr),
                 "--output-dir", str(fp32_dir)]
    inputs: tuple[Path, ...] = ()
    depends: tuple[str, ...] = ()
    if stage.fp32_start is not None:  # stage 2 continues from stage 1's FP32 model
        fp32_argv += ["--pretrained", str(stage.fp32_start)]
        inputs, depends = (stage.fp32_start,), ("stage1/fp32",)
    elif config.raw.models.pretrained:
        pretrained = REPO_ROOT / config.raw.models.pretrained
        fp32_argv += ["--pretrained", str(pretrained)]
        inputs = (pretrained,)
    processes = config.raw.device.nproc_per_node
    fp32 = Step(f"{stage.label}/fp32", tuple(fp32_argv), fp32_dir, ("model_best.pth.tar", "metrics.json"),
                inputs=inputs, depends=depends, runtime_args=runtime, resumable=True, processes=processes)
    fp32_best = fp32_dir / "model_best.pth.tar"
    int8_argv = ["pretrain.py", *common, "--quant", "uniform", "--w-bit", "8", "--a-bit", "8",
                 "--hardware", str(hardware), "--init", str(fp32_best), "--epochs", str(stage.int8_epochs),
                 "--lr", str(stage.int8_lr), "--output-dir", str(int8_dir)]
    int8 = Step(f"{stage.label}/int8", tuple(int8_argv), int8_dir, ("model_best.pth.tar", "metrics.json"),
                inputs=(hardware, fp32_best), depends=(fp32.name,), runtime_args=runtime, resumable=True,
                processes=processes)
    return [fp32, int8]


def _search_step(config: ResolvedConfig, stage: StageData, base: Path, hardware: Path) -> Step:
    raw = config.raw
    q, rl = raw.quantization, raw.training.rl
    out = base / "search"
    int8_best = base / "int8" / "model_best.pth.tar"
    argv = ["rl_quantize.py", *_data_args(config, stage), "--arch", config.arch, "--init", str(int8_best),
            "--hardware", str(hardware), "--min-bit", str(q.min_bit), "--max-bit", str(q.max_bit),
            "--max-accuracy-drop", str(q.max_accuracy_drop), "--episodes", str(rl.train_episodes),
            "--warmup", str(rl.warmup), "--finetune-lr", str(raw.training.learning_rates.small_dataset.rl_finetune),
            "--strategy", rl.strategy, "--top-k", str(rl.top_k), "--search-holdout", str(rl.search_holdout),
            "--seed", str(raw.seed), "--batch-size", str(raw.dataloader.batch_size), "--output-dir", str(out),
            "--resume", "auto"]
    if rl.finetune_steps is not None:
        argv += ["--finetune-steps", str(rl.finetune_steps)]
    else:
        argv += ["--finetune-epochs", str(raw.training.small_dataset.search_finetune_epochs)]
    if rl.search_train_size is not None:
        argv += ["--search-train-size", str(rl.search_train_size)]
    if rl.top_k_finetune_steps is not None:
        argv += ["--top-k-finetune-steps", str(rl.top_k_finetune_steps)]
    if q.search_adc:
        argv += ["--search-adc", "--min-adc-bit", str(q.min_adc_bit), "--max-adc-bit", str(q.max_adc_bit)]
    if q.force_first_last_layer:
        argv += ["--force-first-last", str(q.first_last_bits)]
    if q.consider_cell_resolution:
        argv.append("--cell-resolution-constraint")
    if q.latency_budget is not None:
        argv += ["--latency-budget", str(q.latency_budget)]
    if q.budgets:
        argv += ["--budget", ",".join(f"{name}={ratio}" for name, ratio in q.budgets.items())]
    if q.objective != "latency":  # only when set, so existing experiments keep their search step as it was
        argv += ["--objective", q.objective]
    if q.pareto is not None:  # these four only when set, for the same reason
        argv += ["--pareto", q.pareto if isinstance(q.pareto, str) else ",".join(str(r) for r in q.pareto)]
    if q.search_free_bits:
        argv.append("--search-free-bits")
    if rl.warm_start is not None:
        argv += ["--warm-start", rl.warm_start]
    if rl.sensitivity != "kl":  # the default
        argv += ["--sensitivity", rl.sensitivity]
    if rl.sensitivity_rounds != 1:
        argv += ["--sensitivity-rounds", str(rl.sensitivity_rounds)]
    for knob in ("hidden1", "hidden2", "lr_actor", "lr_critic", "rmsize", "window_length", "tau", "discount",
                 "bsize", "init_delta", "delta_decay"):
        argv += [f"--{knob.replace('_', '-')}", str(getattr(rl, knob))]
    return Step(f"{stage.label}/search", tuple(argv), out,
                ("best_policy.npy", "best_policy.json", "summary.json", "episodes.jsonl"),
                inputs=(hardware, int8_best), depends=(f"{stage.label}/int8",),
                runtime_args=_runtime_args(config), resumable=True, processes=raw.device.nproc_per_node)


def _final_steps(config: ResolvedConfig, stage: StageData, base: Path, hardware: Path, policy: Path) -> list[Step]:
    raw = config.raw
    int8_best = base / "int8" / "model_best.pth.tar"
    ft_dir, export_dir, eval_dir = base / "finetune", base / "export", base / "evaluation"
    ft_argv = ["finetune.py", *_data_args(config, stage), *_training_args(config), "--arch", config.arch,
               "--policy", str(policy), "--hardware", str(hardware), "--init", str(int8_best),
               "--epochs", str(stage.final_epochs), "--lr", str(stage.final_lr),
               "--holdout", str(raw.training.finetune_holdout), "--no-export", "--output-dir", str(ft_dir),
               "--resume", "auto"]
    finetune = Step(f"{stage.label}/finetune", tuple(ft_argv), ft_dir, ("model_best.pth.tar", "report.json"),
                    inputs=(hardware, int8_best, policy), depends=(f"{stage.label}/int8", "stage1/search"),
                    runtime_args=_runtime_args(config), resumable=True, processes=raw.device.nproc_per_node)
    ft_best = ft_dir / "model_best.pth.tar"
    export_argv = ["-m", "lib.export", "--checkpoint", str(ft_best), "--output", str(export_dir / "model.onnx"),
                   "--report", str(export_dir / "export.json"), *_data_args(config, stage)[:2]]
    if stage.root is not None:
        export_argv += ["--data-root", str(stage.root)]
    export = Step(f"{stage.label}/export", tuple(export_argv), export_dir, ("model.onnx", "export.json"),
                  inputs=(ft_best,), depends=(finetune.name,),
                  runtime_args=("--threads", str(raw.device.threads)))
    eval_argv = ["-m", "lib.workflow.evaluate", "--config", str(config.source), "--stage", stage.label,
                 "--output", str(eval_dir / "evaluation.json")]
    evaluation = Step(f"{stage.label}/evaluate", tuple(eval_argv), eval_dir, ("evaluation.json",),
                      inputs=(hardware, base / "fp32" / "metrics.json", base / "int8" / "metrics.json",
                              ft_dir / "report.json", export_dir / "export.json"),
                      depends=(f"{stage.label}/fp32", f"{stage.label}/int8", finetune.name, export.name),
                      settings={"max_accuracy_drop": raw.quantization.max_accuracy_drop}, in_process=True)
    return [finetune, export, evaluation]


def _report_step(config: ResolvedConfig, plan: list[Step]) -> Step:
    exp = config.experiment_dir
    argv = ["-m", "lib.workflow.report", "--config", str(config.source)]
    evaluations = tuple(s.workdir / "evaluation.json" for s in plan if s.name.endswith("/evaluate"))
    return Step("report", tuple(argv), exp, ("results.md", "results.json", "pareto.png", "search.png"),
                inputs=evaluations, depends=tuple(s.name for s in plan), owns_workdir=False, in_process=True)
