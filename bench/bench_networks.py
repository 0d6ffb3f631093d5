"""Whole networks on CIM layers against the same FP32 network: one training step, one eval batch,
and the peak memory of a training step.

Run by hand, not a test:

    .venv/bin/python bench/bench_networks.py                  # resnet20 + resnet18, VGG16 memory
    .venv/bin/python bench/bench_networks.py --models vgg16 --configs cim_aq,default-multibit --only timing
    .venv/bin/python bench/bench_networks.py --only memory --memory-configs default --memory-batch 2
    .venv/bin/python bench/bench_networks.py --profile vgg16 --profile-config default --profile-batch 2

On a loaded 2-core CPU the default run took about 35 minutes (10 of timing, 25 of VGG16 memory); a
bit-serial VGG16 at 224 px takes minutes
per training step (8 DAC cycles × 2 slices of crossbar work), hence its opt-in.

Models (random data, one process, timed round-robin so that a change of machine load affects
every variant alike): resnet20 at 32 px with 10 classes, resnet18 and vgg16 at 224 px with 1000
classes, batch 8. Each CIM model is uniform w8a8, converted with `quantize_model` and
calibrated on one batch first, on one of these crossbars:

    cim_aq              run/hardware/cim_aq_default.yaml (CIM-AQ's file: multi-bit inputs)
    default             run/hardware/default.yaml, bit-serial inputs (the project default)
    default-multibit    run/hardware/default.yaml with input_mode=multi-bit
    cim_aq-float        cim_aq with partial sums in float32 (integer products off, for comparison)
    cim_aq-bf16grad     cim_aq with bfloat16 gradient products (CIM_AQ_GRADIENT_PRODUCTS=bfloat16)
    cim_aq-dynamo       cim_aq with its CPU kernels called through torch.compile instead of directly
    default-bf16grad    default with bfloat16 gradient products

A training step is forward + cross-entropy + backward + SGD step (train mode, within
`scratch_buffers()` as in training); an eval batch is a forward in eval mode under no_grad.
Figures are medians printed as ratios to the FP32 network's (absolute times depend on the machine).

Memory (`--only memory`, or after the timings): each configuration's training step runs in a
fresh subprocess; the figure is the step's peak above the memory resident before it (model,
weights and compiled kernels already there). On CPU that is the process's peak resident set
(VmHWM, reset just before the step; ru_maxrss where it cannot be reset) with glibc returning
freed memory at once; on CUDA torch.cuda.max_memory_allocated.

`--profile MODEL` runs torch.profiler over one CIM training step of MODEL (batch `--profile-batch`)
and prints the top ops by self CPU (or CUDA) time and by memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.cim import HardwareConfig, calibrate, quantize_model  # noqa: E402
from lib.cim.runtime import RUNTIME  # noqa: E402
from lib.cim.scratch import scratch_buffers  # noqa: E402
from lib.cli import FlagError, check_minimums, run  # noqa: E402
from lib.heap import trim_heap  # noqa: E402
from models import create_model  # noqa: E402
from timing import round_robin_medians  # noqa: E402  (bench/timing.py)

HARDWARE_DIR = ROOT / "run" / "hardware"


@dataclass(frozen=True)
class Network:
    """A benchmarked model: registry name, input size (px) and classes."""

    arch: str
    input_size: int
    num_classes: int


@dataclass(frozen=True)
class Crossbar:
    """A CIM configuration: hardware YAML and the fields overridden on top of it."""

    yaml_name: str
    overrides: tuple = ()
    integer_products: bool = True  # False: partial sums in float32 even on an int8-capable CPU
    gradient_products: str = "float32"  # lib.cim.gradient_products format
    direct_kernels: bool = True  # False: CPU kernels through torch.compile (the runtime's direct_kernels)

    def hardware(self) -> HardwareConfig:
        return HardwareConfig.from_yaml(HARDWARE_DIR / self.yaml_name).with_overrides(**dict(self.overrides))


NETWORKS = {n.arch: n for n in (Network("resnet20", 32, 10), Network("resnet18", 224, 1000),
                                Network("vgg16", 224, 1000))}
CROSSBARS = {
    "cim_aq": Crossbar("cim_aq_default.yaml"),
    "default": Crossbar("default.yaml"),
    "default-multibit": Crossbar("default.yaml", (("input_mode", "multi-bit"),)),
    "cim_aq-float": Crossbar("cim_aq_default.yaml", integer_products=False),
    "cim_aq-bf16grad": Crossbar("cim_aq_default.yaml", gradient_products="bfloat16"),
    "default-bf16grad": Crossbar("default.yaml", gradient_products="bfloat16"),
    "cim_aq-dynamo": Crossbar("cim_aq_default.yaml", direct_kernels=False),
}
FP32 = "fp32"
BITS = (8, 8)


def build(network: Network, config: str, calibration: torch.Tensor, device: torch.device) -> nn.Module:
    """The FP32 network (config 'fp32') or its CIM form on a crossbar, calibrated on one batch;
    every variant starts from the same float weights (seed 0)."""
    torch.manual_seed(0)
    model = create_model(network.arch, network.num_classes).to(device)
    if config != FP32:
        quantize_model(model, BITS, CROSSBARS[config].hardware(), input_size=network.input_size)
        model.to(device)
        calibrate(model, [calibration], max_batches=1)
    return model


def random_batch(network: Network, batch: int, device: torch.device, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, network.input_size, network.input_size, generator=generator)
    y = torch.randint(0, network.num_classes, (batch,), generator=generator)
    return x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One forward + loss + backward + SGD step, as a callable (the optimizer made once)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def run():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
        sync(device)
    return run


def eval_batch(model: nn.Module, x: torch.Tensor, device: torch.device):
    def run():
        model.eval()
        with torch.no_grad():
            model(x)
        sync(device)
    return run


def with_products_of(config: str, step):
    """`step` run with integer partial sums on or off and the gradient products in the format the
    configuration says (FP32: as is)."""
    if config == FP32:
        return step
    crossbar = CROSSBARS[config]

    def run():
        with RUNTIME.use(integer_products=crossbar.integer_products, gradient_products=crossbar.gradient_products,
                         direct_kernels=crossbar.direct_kernels):
            step()
    return run


# ------------------------------------------------------------------------------------------ timing
def time_network(network: Network, configs: list[str], batch: int, repeats: int, warmup: int,
                 device: torch.device) -> dict[str, tuple[float, float]]:
    """{config: (training-step ratio, eval ratio)} against FP32, medians taken round-robin."""
    x, y = random_batch(network, batch, device)
    models = {name: build(network, name, x, device) for name in [FP32] + configs}
    with scratch_buffers():  # as in training: the fused backwards reuse their temporaries
        train = round_robin_medians({k: with_products_of(k, training_step(m, x, y, device))
                                     for k, m in models.items()}, repeats, warmup)
    evals = round_robin_medians({k: with_products_of(k, eval_batch(m, x, device)) for k, m in models.items()},
                                repeats, warmup)
    print(f"\n{network.arch} @{network.input_size}, {network.num_classes} classes, batch {batch} "
          f"(median of {repeats}, round-robin; FP32: train step {train[FP32]:.3g} s, eval {evals[FP32]:.3g} s)")
    ratios = {}
    for name in configs:
        ratios[name] = (train[name] / train[FP32], evals[name] / evals[FP32])
        print(f"  {name:<18} training step {ratios[name][0]:6.2f}x   eval {ratios[name][1]:6.2f}x")
    del models
    gc.collect()
    return ratios


# ------------------------------------------------------------------------------------------ memory
def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the process's peak resident set (Linux clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Hand freed heap memory back to the system, so resident memory counts live tensors only."""
    gc.collect()
    trim_heap()


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _cap_address_space(limit_gb: float) -> None:
    """Fail with MemoryError past `limit_gb` (0: 90% of the memory available now) rather than
    waking the OOM killer on a machine others share."""
    limit = int(limit_gb * 2**30) if limit_gb > 0 else int(0.9 * _available_bytes())
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def probe_memory(network: Network, config: str, batch: int, device: torch.device) -> dict:
    """Peak memory (bytes) of one training step above what was resident before it: run in a
    fresh process (see `measure_memory`); one step first, so compiled kernels are in place."""
    calibration, _ = random_batch(network, 2, device, seed=2)  # small: its peak stays below the step's
    model = build(network, config, calibration, device)
    x, y = random_batch(network, batch, device)
    step = with_products_of(config, training_step(model, x, y, device))
    with scratch_buffers():
        step()
    for parameter in model.parameters():
        parameter.grad = None
    _trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with scratch_buffers():
            step()
        peak = torch.cuda.max_memory_allocated(device)
        return {"before": before, "peak": peak, "step": peak - before, "source": "torch.cuda.max_memory_allocated"}
    before = _resident_bytes()
    reset = _reset_peak()
    with scratch_buffers():  # the step's own scratch, freed at the end as in a run that ends
        step()
    peak = _peak_resident_bytes(reset)
    return {"before": before, "peak": peak, "step": peak - before,
            "source": "VmHWM" if reset else "ru_maxrss (includes set-up peaks)"}


def measure_memory(network: Network, configs: list[str], batch: int, device: torch.device, threads: int,
                   limit_gb: float) -> None:
    """Each configuration's training-step peak in a fresh subprocess, printed against FP32's."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results = {}
    for config in [FP32] + configs:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", config,
                   "--memory-model", network.arch, "--memory-batch", str(batch), "--device", str(device),
                   "--threads", str(threads), "--memory-limit-gb", str(limit_gb)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            print(f"  {config:<18} failed (exit {done.returncode}): {tail[0][:200]}")
            continue
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\npeak memory of one {network.arch} @{network.input_size} training step, batch {batch}, "
          f"above the resident model (fresh process each; {results.get(FP32, {}).get('source', '?')})")
    base = results.get(FP32, {}).get("step")
    for config, result in results.items():
        ratio = f"{result['step'] / base:6.2f}x" if base else "   n/a"
        print(f"  {config:<18} step {result['step'] / 2**20:9.0f} MiB  {ratio}   "
              f"(process peak {result['peak'] / 2**20:.0f} MiB)")


# ------------------------------------------------------------------------------------------ profile
def profile_step(network: Network, config: str, batch: int, device: torch.device, rows: int) -> None:
    """torch.profiler over one CIM training step (after a warm-up step): top ops by time and memory."""
    from torch.profiler import ProfilerActivity, profile  # lazy: only this mode needs it

    x, y = random_batch(network, batch, device)
    model = build(network, config, x, device)
    step = with_products_of(config, training_step(model, x, y, device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with scratch_buffers():
        step()
        with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
            step()
    table = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: one {network.arch} @{network.input_size} training step, batch {batch}, {config}")
    print(table.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_memory_usage" if device.type == "cpu" else "self_cuda_memory_usage",
                      row_limit=rows, max_name_column_width=60))


# ------------------------------------------------------------------------------------------ CLI
def _choices(text: str, allowed, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise FlagError(f"{what} {','.join(bad) or repr(text)} is not allowed: expected a comma-separated "
                        f"list of {', '.join(allowed)}")
    return names


def main() -> None:
    raise SystemExit(run(_main))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,resnet18",
                        help=f"comma-separated models to time, of {', '.join(NETWORKS)}")
    parser.add_argument("--configs", default=",".join(CROSSBARS),
                        help=f"comma-separated CIM configurations to time, of {', '.join(CROSSBARS)}")
    parser.add_argument("--batch", type=int, default=8, help="batch of the timed steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", choices=["all", "timing", "memory"], default="all")
    parser.add_argument("--memory-model", default="vgg16", choices=list(NETWORKS), help="model of the memory figure")
    parser.add_argument("--memory-batch", type=int, default=16, help="batch of the memory figure")
    parser.add_argument("--memory-configs", default="cim_aq,default-multibit",
                        help="comma-separated CIM configurations of the memory figure")
    parser.add_argument("--memory-limit-gb", type=float, default=0,
                        help="address-space cap of each memory subprocess on CPU (0: 90%% of the memory available)")
    parser.add_argument("--profile", choices=list(NETWORKS), help="profile one CIM training step of this model instead")
    parser.add_argument("--profile-config", default="default", choices=list(CROSSBARS))
    parser.add_argument("--profile-batch", type=int, default=8)
    parser.add_argument("--profile-rows", type=int, default=20, help="ops listed per table")
    parser.add_argument("--memory-probe", choices=[FP32, *CROSSBARS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise FlagError(f"--device {args.device!r} is not available: expected cpu"
                        f"{' or cuda' if torch.cuda.is_available() else ' (no CUDA device here)'}")
    check_minimums(args, {"batch": 1, "repeats": 1, "warmup": 0, "threads": 0, "memory_batch": 1,
                          "profile_batch": 1, "profile_rows": 1})
    models = _choices(args.models, NETWORKS, "--models")
    configs = _choices(args.configs, CROSSBARS, "--configs")
    memory_configs = _choices(args.memory_configs, CROSSBARS, "--memory-configs")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = RUNTIME.apply_heap()  # the memory probes' own glibc settings (measure_memory) win over it

    if args.memory_probe:
        if device.type == "cpu":
            _cap_address_space(args.memory_limit_gb)
        print(json.dumps(probe_memory(NETWORKS[args.memory_model], args.memory_probe, args.memory_batch, device)))
        return
    if args.profile:
        profile_step(NETWORKS[args.profile], args.profile_config, args.profile_batch, device, args.profile_rows)
        return
    print(f"device {device}, {torch.get_num_threads()} thread(s), w{BITS[0]}a{BITS[1]}, freed memory: {heap}; "
          "ratios vs FP32")
    if args.only in ("all", "timing"):
        table = {arch: time_network(NETWORKS[arch], configs, args.batch, args.repeats, args.warmup, device)
                 for arch in models}
        print("\nsummary (training step / eval, x FP32; targets <= 3x / <= 2x)")
        print("  " + " " * 10 + "".join(f"{c:>22}" for c in configs))
        for arch, ratios in table.items():
            print(f"  {arch:<10}" + "".join(f"{ratios[c][0]:6.2f} / {ratios[c][1]:5.2f}".rjust(22) for c in configs))
    if args.only in ("all", "memory"):
        measure_memory(NETWORKS[args.memory_model], memory_configs, args.memory_batch, device, args.threads,
                       args.memory_limit_gb)


if __name__ == "__main__":
    main()
