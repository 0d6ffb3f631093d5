"""Every knob of a mixed-precision search, typed and checked once (before any data or model is touched)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

from lib.bit_limits import BIT_RANGES
from lib.errors import UserError
from lib.objectives import OBJECTIVES

STRATEGIES = ("ddpg", "random", "ilp", "greedy")
AGENT_STRATEGIES = ("ddpg", "random")
WARM_STARTS = ("ilp",)
SENSITIVITIES = ("measured", "kl", "hessian")
LAYER_BIT_RANGE = BIT_RANGES["w_bit"]
ADC_BIT_RANGE = BIT_RANGES["adc_bits"]
Size = Union[int, float]


class SearchConfigError(UserError, ValueError):
    """A search setting outside what is allowed; the message names the value and the allowed range."""


@dataclass(frozen=True)
class DDPGConfig:
    """The agent's hyperparameters (HAQ's defaults)."""

    hidden1: int = 300
    hidden2: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    rmsize: int = 128          # replay memory size, in episodes (× decisions per episode transitions)
    window_length: int = 1    # states per observation; HAQ's flag, only 1 is supported
    tau: float = 0.01
    discount: float = 1.0
    bsize: int = 64
    init_delta: float = 0.5
    delta_decay: float = 0.99
    moving_alpha: float = 0.5  # weight of the newest reward in the moving-average baseline

    def check(self) -> None:
        for key in ("hidden1", "hidden2", "rmsize", "bsize"):
            _int_at_least(key, getattr(self, key), 1)
        if self.window_length != 1:
            raise SearchConfigError(f"window_length={self.window_length!r} is not allowed: only 1 (HAQ's default, "
                                    f"one state per observation) is supported")
        for key in ("lr_actor", "lr_critic", "init_delta"):
            if not getattr(self, key) > 0:
                raise SearchConfigError(f"{key}={getattr(self, key)!r} is not allowed: expected a number > 0")
        for key in ("tau", "discount", "delta_decay", "moving_alpha"):
            if not 0 <= getattr(self, key) <= 1:
                raise SearchConfigError(f"{key}={getattr(self, key)!r} is not allowed: expected a number in [0, 1]")


@dataclass(frozen=True)
class SearchConfig:
    """One search: model and data, the space of bits, the episode budget, reward, agent, outputs.

    init: the INT8 (uniform-quantized) checkpoint every episode starts from.
    hardware: crossbar YAML (None = the init checkpoint's hardware).
    layer_dims: optional CIM-AQ layer-dims YAML priced instead of the traced model (same length).
    max_accuracy_drop: percentage points below the baseline that still count as feasible.
    finetune_steps / finetune_epochs: per-episode finetune budget (batches, or epochs when set).
    force_first_last: bits (weights and inputs) fixed for the first and last layer; None = searched.
    latency_budget: HAQ's hard-budget mode: every evaluated policy is lowered to ≤ this latency ratio.
    budgets: hard budgets on other objectives ({"energy": 0.6, ...}, ratios vs uniform 8-bit), met
        together with latency_budget; a "latency" entry is moved to latency_budget.
    objective: the ratio the reward prices: latency (CIM-AQ's), energy, edp or area.
    search_holdout: training images held out as the search's accuracy split (count or fraction).
    search_train_size: cap on the training images used for finetuning (None = all the rest).
    eval_noise: a device-noise preset (lib.cim.noise_config) every policy, the baseline included, is
        scored under: its accuracy is the mean over eval_repeats seeded programmings of the cells
        (None: the ideal crossbar, one evaluation).
    strategy: ddpg | random (agents, one policy per episode), ilp (per-layer sensitivities and an
        integer program over the cost tables, lib.search.ilp), greedy (lower_to_budget from the
        highest bits, no agent).
    search_free_bits: also search the decisions that change no priced cost (default: held at
        their highest allowed bits, lib.search.free).
    pareto: budgets on the objective the ILP solves one after another (a front); empty = only the
        configured budgets.
    warm_start: "ilp" = DDPG's warm-up episodes are the solved front's policies.
    sensitivity: how the ILP scores a layer's bits: measured (the loss increase with only that
        layer changed), kl (the output KL divergence with only that layer changed) or hessian
        (Hutchinson trace × ‖Q(x) − x‖²), lib.search.sensitivity.
    sensitivity_rounds: 1 = score at INT8 only; r > 1 = also r − 1 rounds measured around the policy
        the mean of the rounds so far solves for the budget (measured or kl, needs a budget),
        lib.search.refine.
    sensitivity_cache: folder of cached sensitivities (None = <output_dir>/sensitivity).
    """

    init: str
    output_dir: str
    arch: Optional[str] = None
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    input_size: Optional[int] = None
    hardware: Optional[str] = None
    layer_dims: Optional[str] = None
    min_bit: int = 2
    max_bit: int = 8
    max_accuracy_drop: float = 1.0
    episodes: int = 600
    warmup: int = 20
    finetune_steps: int = 100
    finetune_epochs: Optional[float] = None
    finetune_lr: float = 0.001
    calibration_batches: int = 2
    search_adc: bool = False
    min_adc_bit: int = 4
    max_adc_bit: int = 8
    force_first_last: Optional[int] = None
    cell_resolution_constraint: bool = False
    latency_budget: Optional[float] = None
    budgets: dict = field(default_factory=dict)
    objective: str = "latency"
    strategy: str = "ddpg"
    search_free_bits: bool = False
    pareto: tuple = ()
    warm_start: Optional[str] = None
    sensitivity: str = "kl"
    sensitivity_batches: int = 2
    hutchinson_probes: int = 4
    sensitivity_rounds: int = 1
    sensitivity_cache: Optional[str] = None
    top_k: int = 3
    top_k_finetune_steps: int = 300
    search_holdout: Size = 0.1
    search_train_size: Optional[Size] = None
    seed: int = 0
    eval_noise: Optional[str] = None
    eval_repeats: int = 1
    resume: bool = False
    overwrite: bool = False
    batch_size: int = 64
    workers: int = 0
    threads: int = 0           # torch CPU threads for the search (0 = leave as is)
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, Mapping):
            raise SearchConfigError(f"budgets={self.budgets!r} is not allowed: expected a mapping "
                                    f"{{objective: ratio}} over {list(OBJECTIVES)}")
        budgets = dict(self.budgets)
        if "latency" in budgets:  # one place for the latency budget, whichever way it was given
            latency = budgets.pop("latency")
            if self.latency_budget is not None and self.latency_budget != latency:
                raise SearchConfigError(f"two latency budgets: latency_budget={self.latency_budget} and "
                                        f"budget latency={latency}; give one")
            object.__setattr__(self, "latency_budget", latency)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "pareto", tuple(self.pareto))

    @property
    def all_budgets(self) -> dict:
        """{objective: ratio} of every hard budget, latency first (empty: no budget mode)."""
        latency = {} if self.latency_budget is None else {"latency": self.latency_budget}
        return {**latency, **self.budgets}

    def check(self) -> None:
        """Refuse values that cannot work, naming the value and what is allowed."""
        low, high = LAYER_BIT_RANGE
        for key in ("min_bit", "max_bit"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise SearchConfigError(f"{key}={value!r} is not allowed: the CIM layers support bits in "
                                        f"[{low}, {high}]")
        if self.min_bit > self.max_bit:
            raise SearchConfigError(f"min_bit={self.min_bit} > max_bit={self.max_bit}: expected min_bit <= max_bit")
        if self.force_first_last is not None and not low <= self.force_first_last <= high:
            raise SearchConfigError(f"force_first_last={self.force_first_last} is not allowed: the CIM layers "
                                    f"support bits in [{low}, {high}]")
        if self.search_adc:
            adc_low, adc_high = ADC_BIT_RANGE
            for key in ("min_adc_bit", "max_adc_bit"):
                value = getattr(self, key)
                if not isinstance(value, int) or not adc_low <= value <= adc_high:
                    raise SearchConfigError(f"{key}={value!r} is not allowed: the ADC supports bits in "
                                            f"[{adc_low}, {adc_high}]")
            if self.min_adc_bit > self.max_adc_bit:
                raise SearchConfigError(f"min_adc_bit={self.min_adc_bit} > max_adc_bit={self.max_adc_bit}: "
                                        f"expected min_adc_bit <= max_adc_bit")
        if self.strategy not in STRATEGIES:
            raise SearchConfigError(f"strategy={self.strategy!r} is not allowed: expected one of {list(STRATEGIES)}")
        if self.warm_start is not None and self.warm_start not in WARM_STARTS:
            raise SearchConfigError(f"warm_start={self.warm_start!r} is not allowed: expected one of "
                                    f"{list(WARM_STARTS)}")
        if self.warm_start is not None and self.strategy != "ddpg":
            raise SearchConfigError(f"warm_start={self.warm_start!r} needs strategy='ddpg' (its warm-up episodes); "
                                    f"strategy is {self.strategy!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise SearchConfigError(f"sensitivity={self.sensitivity!r} is not allowed: expected one of "
                                    f"{list(SENSITIVITIES)}")
        _int_at_least("sensitivity_batches", self.sensitivity_batches, 1)
        _int_at_least("hutchinson_probes", self.hutchinson_probes, 1)
        _int_at_least("sensitivity_rounds", self.sensitivity_rounds, 1)
        if self.sensitivity_rounds > 1 and self.sensitivity == "hessian":
            raise SearchConfigError(f"sensitivity_rounds={self.sensitivity_rounds} measures around a policy, which "
                                    f"sensitivity='hessian' cannot; use measured or kl, or sensitivity_rounds=1")
        if self.sensitivity_rounds > 1 and not self.all_budgets:
            raise SearchConfigError(f"sensitivity_rounds={self.sensitivity_rounds} measures around the policy solved "
                                    f"for the budget, and no budget is set; set latency_budget (or budgets) or "
                                    f"sensitivity_rounds=1")
        for ratio in self.pareto:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise SearchConfigError(f"pareto budget {ratio!r} is not allowed: expected ratios of {self.objective} "
                                        f"vs uniform 8-bit in (0, 1]")
        if self.pareto and self.strategy not in ("ilp",) and self.warm_start is None:
            raise SearchConfigError(f"pareto={list(self.pareto)} is solved by strategy='ilp' (or seeds "
                                    f"warm_start='ilp'); strategy is {self.strategy!r}")
        if self.strategy == "greedy" and not self.all_budgets:
            raise SearchConfigError("strategy='greedy' lowers bits to a budget: give latency_budget or budgets")
        _int_at_least("episodes", self.episodes, 1)
        _int_at_least("warmup", self.warmup, 0)
        _int_at_least("finetune_steps", self.finetune_steps, 0)
        _int_at_least("calibration_batches", self.calibration_batches, 1)
        _int_at_least("top_k", self.top_k, 0)
        _int_at_least("top_k_finetune_steps", self.top_k_finetune_steps, 0)
        _int_at_least("eval_repeats", self.eval_repeats, 1)
        from lib.cim.noise_config import PRESETS  # lazy: the lib.cim package loads torch, which --help never needs
        if self.eval_noise is not None and self.eval_noise not in PRESETS:
            raise SearchConfigError(f"eval_noise={self.eval_noise!r} is not allowed: expected a noise preset, one of "
                                    f"{sorted(PRESETS)}")
        if self.eval_repeats > 1 and self.eval_noise is None:
            raise SearchConfigError(f"eval_repeats={self.eval_repeats} needs eval_noise: the ideal crossbar gives the "
                                    f"same accuracy every time")
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("workers", self.workers, 0)
        _int_at_least("threads", self.threads, 0)
        if self.finetune_epochs is not None and not self.finetune_epochs > 0:
            raise SearchConfigError(f"finetune_epochs={self.finetune_epochs!r} is not allowed: expected a number > 0")
        if not self.finetune_lr > 0:
            raise SearchConfigError(f"finetune_lr={self.finetune_lr!r} is not allowed: expected a number > 0")
        if not self.max_accuracy_drop >= 0:
            raise SearchConfigError(f"max_accuracy_drop={self.max_accuracy_drop!r} is not allowed: expected "
                                    f"percentage points >= 0")
        if self.latency_budget is not None and not 0 < self.latency_budget <= 1:
            raise SearchConfigError(f"latency_budget={self.latency_budget!r} is not allowed: expected a latency "
                                    f"ratio vs uniform 8-bit in (0, 1]")
        if self.objective not in OBJECTIVES:
            raise SearchConfigError(f"objective={self.objective!r} is not allowed: expected one of "
                                    f"{list(OBJECTIVES)}")
        for name, ratio in self.budgets.items():
            if name not in OBJECTIVES:
                raise SearchConfigError(f"budget {name!r} is not allowed: expected budgets on {list(OBJECTIVES)}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise SearchConfigError(f"budget {name}={ratio!r} is not allowed: expected a ratio of {name} vs "
                                        f"uniform 8-bit in (0, 1]")
        for key in ("search_holdout", "search_train_size"):
            value = getattr(self, key)
            if value is None and key == "search_train_size":
                continue
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1
                                               or isinstance(value, float) and 0 < value < 1):
                raise SearchConfigError(f"{key}={value!r} is not allowed: expected an image count >= 1 or a "
                                        f"fraction in (0, 1)")
        self.ddpg.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        data = dict(data)
        ddpg = DDPGConfig(**data.pop("ddpg", {}))
        return cls(**data, ddpg=ddpg)


def parse_budgets(texts: Sequence[str]) -> dict:
    """{objective: ratio} from 'NAME=RATIO[,NAME=RATIO...]' strings (e.g. 'latency=0.5,energy=0.6')."""
    budgets: dict = {}
    for text in texts:
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq or name not in OBJECTIVES:
                raise SearchConfigError(f"budget {item!r} is not allowed: expected NAME=RATIO with NAME one of "
                                        f"{list(OBJECTIVES)}, e.g. latency=0.5,energy=0.6")
            try:
                ratio = float(value)
            except ValueError:
                raise SearchConfigError(f"budget {item!r} is not allowed: {value.strip()!r} is not a number; "
                                        f"expected a ratio in (0, 1]") from None
            if name in budgets and budgets[name] != ratio:
                raise SearchConfigError(f"budget {name!r} is given twice ({budgets[name]} and {ratio}); give it once")
            budgets[name] = ratio
    return budgets


def parse_pareto(text: str) -> tuple:
    """Budgets from 'LOW:HIGH:STEP' (HIGH included when the steps reach it) or 'R1,R2,...'."""
    text = text.strip()
    try:
        if ":" in text:
            low, high, step = (float(part) for part in text.split(":"))
            if not step > 0 or low > high:
                raise ValueError
            count = int(round((high - low) / step + 1e-9))
            return tuple(round(low + k * step, 10) for k in range(count + 1) if low + k * step <= high + 1e-9)
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SearchConfigError(f"pareto={text!r} is not allowed: expected LOW:HIGH:STEP with LOW <= HIGH and "
                                f"STEP > 0 (e.g. 0.3:0.8:0.05) or a list of ratios (e.g. 0.35,0.4,0.6)") from None


def _int_at_least(key: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SearchConfigError(f"{key}={value!r} is not allowed: expected an integer >= {low}")
