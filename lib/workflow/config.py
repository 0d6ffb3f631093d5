"""The workflow's experiment YAML: CIM-AQ's layout plus what CIM-AQ leaves to hard-coded values.

`load_config(path)` validates the whole file before anything runs (pydantic for keys and types,
then the checks that need several keys or the disk) and returns a frozen `WorkflowConfig`;
every problem is a `WorkflowConfigError` naming the key path and what is allowed. Every key is
listed and explained in run/configs/template.yaml.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lib.bit_limits import BIT_RANGES
from lib.cim.hardware import PSUM_GRANULARITIES, WEIGHT_GRANULARITIES, HardwareConfig
from lib.errors import UserError
from lib.search.config import parse_pareto
from lib.objectives import ENERGY_OBJECTIVES, OBJECTIVES
from lib.workflow import names

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bits the search may give a layer's weights/inputs and its ADC: what the CIM layers support.
BIT_RANGE = BIT_RANGES["w_bit"]
ADC_BIT_RANGE = BIT_RANGES["adc_bits"]
# Datasets read from a folder the user must provide (the built-in digits live in a cache instead).
FOLDER_DATASETS = ("imagefolder", "cifar10", "cifar100")


class WorkflowConfigError(UserError, ValueError):
    """An experiment YAML with an unknown key, a wrong type or an impossible value."""


class Section(BaseModel):
    """A YAML mapping: unknown keys are errors, values keep their YAML types, objects are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Models(Section):
    quant_model: str = "resnet20"
    fp32_model: Optional[str] = None
    input_size: Optional[int] = Field(None, gt=0)
    pretrained: Optional[str] = None


class Dataset(Section):
    name: str
    root: Optional[str] = None
    enabled: bool = True


class Datasets(Section):
    small: Dataset
    large: Optional[Dataset] = None


class Quantization(Section):
    max_accuracy_drop: float = Field(1.0, ge=0)
    min_bit: int = 2
    max_bit: int = 8
    force_first_last_layer: bool = True
    first_last_bits: int = 8
    consider_cell_resolution: bool = False
    search_adc: bool = False
    min_adc_bit: int = 4
    max_adc_bit: int = 8
    latency_budget: Optional[float] = Field(None, gt=0, le=1)
    objective: Literal[OBJECTIVES] = "latency"  # type: ignore[valid-type]
    budgets: dict[Literal[OBJECTIVES], Annotated[float, Field(gt=0, le=1)]] = {}  # type: ignore[valid-type]
    # the ILP's sweep on the objective: "LOW:HIGH:STEP" or a list of ratios (None = the budget only)
    pareto: Optional[Union[str, list[Annotated[float, Field(gt=0, le=1)]]]] = None
    search_free_bits: bool = False

    @field_validator("pareto")
    @classmethod
    def _sweep(cls, value):
        """A sweep string must parse to ratios in (0, 1] (checked here, before any training)."""
        if isinstance(value, str):
            ratios = parse_pareto(value)
            if not ratios or any(not 0 < r <= 1 for r in ratios):
                raise ValueError(f"pareto={value!r}: expected ratios in (0, 1], e.g. 0.3:0.8:0.05")
        return value


class Hardware(Section):
    config: str = "run/hardware/default.yaml"
    weight_granularity: Optional[Literal[WEIGHT_GRANULARITIES]] = None  # type: ignore[valid-type]
    psum_granularity: Optional[Literal[PSUM_GRANULARITIES]] = None  # type: ignore[valid-type]
    input_mode: Optional[Literal["bit-serial", "multi-bit"]] = None


class LargeLearningRates(Section):
    fp32_pretraining: float = Field(0.0005, gt=0)
    int8_pretraining: float = Field(0.001, gt=0)
    mixed_precision_finetuning: float = Field(0.0005, gt=0)


class SmallLearningRates(LargeLearningRates):
    rl_finetune: float = Field(0.001, gt=0)


class LearningRates(Section):
    small_dataset: SmallLearningRates = SmallLearningRates()
    large_dataset: LargeLearningRates = LargeLearningRates()


class RL(Section):
    """The search: CIM-AQ's episode count plus what its run script hard-codes."""

    train_episodes: int = Field(600, ge=1)
    warmup: int = Field(30, ge=0)
    strategy: Literal["ddpg", "random", "ilp", "greedy"] = "ddpg"
    warm_start: Optional[Literal["ilp"]] = None
    sensitivity: Literal["measured", "kl", "hessian"] = "kl"
    sensitivity_rounds: int = Field(1, ge=1)
    finetune_steps: Optional[int] = Field(None, ge=0)
    search_holdout: Union[int, float] = Field(10000, gt=0)
    search_train_size: Optional[Union[int, float]] = Field(20000, gt=0)
    top_k: int = Field(1, ge=0)
    top_k_finetune_steps: Optional[int] = Field(None, ge=0)
    hidden1: int = Field(300, ge=1)
    hidden2: int = Field(300, ge=1)
    lr_actor: float = Field(5e-5, gt=0)
    lr_critic: float = Field(1e-3, gt=0)
    rmsize: int = Field(128, ge=1)
    window_length: int = Field(1, ge=1)
    tau: float = Field(0.01, gt=0, le=1)
    discount: float = Field(1.0, ge=0, le=1)
    bsize: int = Field(64, ge=1)
    init_delta: float = Field(0.6, ge=0)
    delta_decay: float = Field(0.997, gt=0, le=1)


class StageTraining(Section):
    fp32_epochs: int = Field(30, ge=1)
    int8_epochs: int = Field(30, ge=1)
    final_finetune_epochs: int = Field(30, ge=1)


class SmallTraining(StageTraining):
    search_finetune_epochs: float = Field(3, ge=0)


class LargeTraining(StageTraining):
    fp32_from_stage1: bool = False


class Training(Section):
    learning_rates: LearningRates = LearningRates()
    rl: RL = RL()
    small_dataset: SmallTraining = SmallTraining()
    large_dataset: LargeTraining = LargeTraining()
    finetune_holdout: float = Field(0.1, ge=0, lt=1)


class Output(Section):
    prefix: str = ""
    root: str = "runs/workflow"


class Device(Section):
    gpu_id: Optional[Union[str, int]] = None
    device: str = "auto"
    threads: int = Field(0, ge=0)
    compile_kernels: Optional[bool] = None  # the runtime's compile setting of every step; None: the environment's
    # the runtime's gradient products of every step (lib.cim.runtime); None: the environment's
    gradient_products: Optional[Literal["float32", "bfloat16"]] = None
    # processes per training/search step: > 1 launches pretrain/finetune/search through torchrun
    nproc_per_node: int = Field(1, ge=1)


class Dataloader(Section):
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(2, ge=0)


class Amp(Section):
    enable: bool = False


class Wandb(Section):
    enable: bool = False
    project: str = "cim-aq-quantization"


class Logging(Section):
    wandb: Wandb = Wandb()
    progress: bool = True


class WorkflowConfig(Section):
    models: Models = Models()
    datasets: Datasets
    quantization: Quantization = Quantization()
    hardware: Hardware = Hardware()
    training: Training = Training()
    output: Output = Output()
    device: Device = Device()
    dataloader: Dataloader = Dataloader()
    amp: Amp = Amp()
    logging: Logging = Logging()
    # CIM-AQ's disk clean-up switches: accepted and unused (every artifact stays in the experiment dir).
    space_management: dict[str, Any] = {}
    seed: int = 0


class ResolvedConfig(BaseModel):
    """A validated config plus what validation derived: our model/dataset names, the hardware, paths."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: Path
    raw: WorkflowConfig
    arch: str
    input_size: int
    small_kind: str
    small_root: Optional[Path]
    large_kind: Optional[str]
    large_root: Optional[Path]
    hardware: HardwareConfig
    hardware_name: str
    experiment_dir: Path

    @property
    def stage2_enabled(self) -> bool:
        return self.large_kind is not None


# ------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path) -> ResolvedConfig:
    """Read, validate and resolve an experiment YAML; any problem raises WorkflowConfigError."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WorkflowConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise WorkflowConfigError(f"{path}: expected a mapping of sections at top level, got {type(data).__name__}")
    try:
        config = WorkflowConfig.model_validate(data)
    except ValidationError as err:
        raise WorkflowConfigError(f"{path}: " + "; ".join(_describe(e) for e in err.errors())) from None
    return resolve(config, path)


def resolve(config: WorkflowConfig, source: Path) -> ResolvedConfig:
    """The checks that need several keys, the model registry or the disk; then derived values."""
    from models import list_models  # torchvision's registry; only needed once keys and types are right

    q = config.quantization
    _check_range("quantization.min_bit", q.min_bit, BIT_RANGE)
    _check_range("quantization.max_bit", q.max_bit, BIT_RANGE)
    if q.min_bit > q.max_bit:
        raise WorkflowConfigError(f"{source}: quantization.min_bit={q.min_bit} > quantization.max_bit={q.max_bit}; "
                                  "min_bit must be <= max_bit")
    _check_range("quantization.first_last_bits", q.first_last_bits, BIT_RANGE)
    if q.search_adc:
        _check_range("quantization.min_adc_bit", q.min_adc_bit, ADC_BIT_RANGE)
        _check_range("quantization.max_adc_bit", q.max_adc_bit, ADC_BIT_RANGE)
        if q.min_adc_bit > q.max_adc_bit:
            raise WorkflowConfigError(f"{source}: quantization.min_adc_bit={q.min_adc_bit} > "
                                      f"quantization.max_adc_bit={q.max_adc_bit}; min must be <= max")
    hardware = _hardware(config.hardware, source)
    if q.latency_budget is not None and q.budgets.get("latency", q.latency_budget) != q.latency_budget:
        raise WorkflowConfigError(f"{source}: quantization.latency_budget={q.latency_budget} and "
                                  f"quantization.budgets.latency={q.budgets['latency']} disagree; give one")
    needs = sorted({name for name in (q.objective, *q.budgets) if name in ENERGY_OBJECTIVES})
    if needs and hardware.energy is None:
        raise WorkflowConfigError(f"{source}: quantization objective/budgets {needs} need an `energy` section in "
                                  f"hardware.config={config.hardware.config!r}, which has none")
    if q.consider_cell_resolution:
        usable = [b for b in range(q.min_bit, q.max_bit + 1) if b % hardware.cell_bits == 0]
        if not usable:
            raise WorkflowConfigError(
                f"{source}: quantization.consider_cell_resolution=true allows only weight bits that are multiples "
                f"of the hardware's cell_bits={hardware.cell_bits}, and none lies in min_bit..max_bit="
                f"{q.min_bit}..{q.max_bit}")
    known = list_models()
    arch = _model(config.models.quant_model, "models.quant_model", known, source)
    if config.models.fp32_model is not None:
        fp32 = _model(config.models.fp32_model, "models.fp32_model", known, source)
        if fp32 != arch:
            raise WorkflowConfigError(f"{source}: models.fp32_model={config.models.fp32_model!r} ({fp32}) and "
                                      f"models.quant_model={config.models.quant_model!r} ({arch}) must be the "
                                      "same network")
    if config.models.pretrained is not None:
        _existing(config.models.pretrained, "models.pretrained", source, kind="file")
    small_kind, small_root = _dataset(config.datasets.small, "datasets.small", source)
    large_kind = large_root = None
    large = config.datasets.large
    if large is not None and large.enabled:
        large_kind, large_root = _dataset(large, "datasets.large", source)
        if (large_kind, large_root, large.name) == (small_kind, small_root, config.datasets.small.name):
            large_kind = large_root = None  # same data twice: CIM-AQ runs stage 1 only
    input_size = config.models.input_size or (32 if small_kind in ("digits", "digits-small", "cifar10", "cifar100")
                                              else 224)
    hardware_name = Path(config.hardware.config).stem
    parts = [p for p in (config.output.prefix, arch, hardware_name) if p]
    experiment_dir = _path(config.output.root) / "_".join(parts)
    return ResolvedConfig(source=source, raw=config, arch=arch, input_size=input_size, small_kind=small_kind,
                          small_root=small_root, large_kind=large_kind, large_root=large_root, hardware=hardware,
                          hardware_name=hardware_name, experiment_dir=experiment_dir)


# ------------------------------------------------------------------------------------------ helpers
def _path(value: str) -> Path:
    """CIM-AQ's rule: a relative path is relative to the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _existing(value: str, key: str, source: Path, kind: str) -> Path:
    path = _path(value)
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise WorkflowConfigError(f"{source}: {key}={value!r}: no such {kind} ({path})")
    return path


def _check_range(key: str, value: int, allowed: tuple[int, int]) -> None:
    if not allowed[0] <= value <= allowed[1]:
        raise WorkflowConfigError(f"{key}={value} is not allowed: expected {allowed[0]}..{allowed[1]}")


def _model(name: str, key: str, known: list[str], source: Path) -> str:
    try:
        return names.resolve_model(name, known)
    except ValueError as err:
        raise WorkflowConfigError(f"{source}: {key}: {err}") from None


def _dataset(section: Dataset, key: str, source: Path) -> tuple[str, Optional[Path]]:
    try:
        kind = names.resolve_dataset(section.name)
    except ValueError as err:
        raise WorkflowConfigError(f"{source}: {key}.name: {err}") from None
    if kind in FOLDER_DATASETS:
        if section.root is None:
            raise WorkflowConfigError(f"{source}: {key}.root is required for dataset {section.name!r} (a folder)")
        return kind, _existing(section.root, f"{key}.root", source, kind="folder")
    return kind, (_path(section.root) if section.root is not None else None)


def _hardware(section: Hardware, source: Path) -> HardwareConfig:
    path = _path(section.config)
    try:
        hw = HardwareConfig.from_yaml(path)
        overrides = {k: v for k, v in (("weight_granularity", section.weight_granularity),
                                       ("psum_granularity", section.psum_granularity),
                                       ("input_mode", section.input_mode)) if v is not None}
        return hw.with_overrides(**overrides)
    except (UserError, OSError, yaml.YAMLError) as err:
        raise WorkflowConfigError(f"{source}: hardware.config={section.config!r}: {err}") from None


def _describe(error: dict) -> str:
    """One pydantic error as 'key.path: problem (allowed ...)', suggesting the closest key for a typo."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key{hint} (allowed here: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _allowed_keys(loc: list[str]) -> list[str]:
    """The field names of the section at `loc` (a key path into WorkflowConfig)."""
    model: Any = WorkflowConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation] + list(getattr(annotation, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)
