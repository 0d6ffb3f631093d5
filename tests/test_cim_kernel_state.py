"""Who owns the CIM kernels' process state: the compile mode (pinned by the CLIs' set-up), the
kernels that failed to compile (each on its own), and the scratch buffers (freed by their scope)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lib import cli
from lib.cim import CIMConv2d, HardwareConfig, calibrate
from lib.cim.adc_kernels import KERNELS, CompileModeError, compile_mode, configure_compile, kernel_report
from lib.cim.scratch import SCRATCH, scratch_buffers
from lib.search.search import run_search
from lib.training import OptimConfig, Tracker, fit
from search_support import make_int8_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def unpinned():
    """Leave the process as the test found it: no pinned mode, no recorded failures."""
    KERNELS.unpin()
    yield
    KERNELS.unpin()


def test_cli_setup_pins_the_mode_from_the_environment(unpinned, monkeypatch):
    monkeypatch.setenv("CIM_AQ_COMPILE", "0")
    cli.setup("warning")
    assert compile_mode() == "0"
    monkeypatch.setenv("CIM_AQ_COMPILE", "1")  # read once: later changes do not reach the kernels
    assert compile_mode() == "0"
    assert kernel_report() == {"compile_mode": "0", "eager_after_failed_compile": [], "freed_memory": "release"}
    KERNELS.unpin()
    assert compile_mode() == "1"  # unpinned, a library follows the variable


def test_bad_mode_is_a_user_error_naming_the_value(unpinned, monkeypatch):
    monkeypatch.setenv("CIM_AQ_COMPILE", "yes")
    with pytest.raises(CompileModeError, match=r"CIM_AQ_COMPILE='yes' is not allowed: expected one of \['auto', '0', '1'\]"):
        configure_compile()
    with pytest.raises(CompileModeError, match="compile mode='2' is not allowed"):
        configure_compile("2")


def test_cli_with_a_bad_mode_exits_2_with_one_line():
    env = {**os.environ, "CIM_AQ_COMPILE": "fast"}
    done = subprocess.run([sys.executable, "-m", "lib.workflow.report", "--config", "missing.yaml"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: CIM_AQ_COMPILE='fast' is not allowed: expected one of ['auto', '0', '1']"]
    assert "Traceback" not in done.stderr


def _scaled(x, scale):
    return x * scale + 0.25


def test_a_failed_compile_disables_only_that_kernel(unpinned):
    """A real compile failure (Inductor pointed at a C++ compiler that does not exist) for one
    kernel; the next kernel, compiled with the working compiler, still runs fused."""
    configure_compile("auto")
    x = torch.randn(64, 8)
    scale = torch.tensor(0.5)
    with torch._inductor.config.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}):
        out = KERNELS.run("refuses", _scaled, _scaled, x, x, scale)
    assert torch.equal(out, x * 0.5 + 0.25)
    assert KERNELS.failed == {"refuses"}
    assert kernel_report()["eager_after_failed_compile"] == ["refuses"]
    # the ADC kernels still compile and run fused, with the eager kernels' values
    lo, hi = torch.tensor(-8.0), torch.tensor(7.0)
    fused = KERNELS.run("quant_forward", _fused_probe, None, x, x, scale, lo, hi)
    assert fused is not None and KERNELS.failed == {"refuses"}
    assert torch.equal(fused, torch.round(x / scale).clamp(-8, 7) * scale)


def _fused_probe(x, scale, lo, hi):
    """The input quantizer's fused forward (None back would mean it ran eagerly)."""
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def test_scratch_is_handed_out_only_inside_its_scope_and_freed_after():
    like = torch.empty(1)
    assert SCRATCH.tensor("probe", (4, 4), like) is None
    with pytest.raises(KeyError):
        with scratch_buffers():
            with scratch_buffers():  # nested: the outer block still owns the buffers
                first = SCRATCH.tensor("probe", (4, 4), like)
            again = SCRATCH.tensor("probe", (2, 8), like)
            assert again.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            raise KeyError("an error ends the block")
    assert SCRATCH.buffers == {} and SCRATCH.tensor("probe", (4, 4), like) is None


class _ScratchWatch(Tracker):
    """A tracker (no TensorBoard) noting which scratch slots exist when fit logs an epoch."""

    def __init__(self, out_dir):
        super().__init__(out_dir, tensorboard=False)
        self.seen = []

    def log(self, metrics, step):
        self.seen.append(sorted(slot for slot, _ in SCRATCH.buffers))


def test_fit_owns_the_scratch_of_its_training_steps(unpinned, tmp_path):
    """During fit a CIM conv's fused backward takes its partial-sum gradient from scratch (its ADC
    clips most columns, so the slices do not merge); when fit returns the buffers are gone."""
    configure_compile("auto")
    torch.manual_seed(0)
    hw = HardwareConfig(rows=40, cols=64, cell_bits=2, adc_bits=5, psum_granularity="column",
                        input_mode="multi-bit")
    model = nn.Sequential(CIMConv2d(3, 4, 3, padding=1, hw=hw, w_bit=4, a_bit=4), nn.Flatten(), nn.Linear(4 * 36, 3))
    batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    calibrate(model, [images for images, _ in batches])
    with torch.no_grad():
        model[0].psum_adc.step.div_(50)
    assert SCRATCH.buffers == {}
    watch = _ScratchWatch(tmp_path)
    fit(model, batches, batches, OptimConfig(epochs=1, lr=0.01), tmp_path / "run", tracker=watch, progress=False)
    assert watch.seen and "psum_grad" in watch.seen[0]
    assert SCRATCH.buffers == {}


def test_the_search_records_the_mode_and_frees_its_scratch(unpinned, tmp_path):
    """A tiny real search, with the mode pinned as its CLI would: summary.json records it, and the
    scratch its finetuning steps used is gone when run_search returns."""
    configure_compile("0")
    out = tmp_path / "search"
    run_search(tiny_config(make_int8_checkpoint(tmp_path / "int8"), out, episodes=2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernels"] == {"compile_mode": "0", "eager_after_failed_compile": [], "freed_memory": "release"}
    assert SCRATCH.buffers == {} and SCRATCH.depth == 0
