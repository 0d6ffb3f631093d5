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
from lib.cim.fused_op import FusedOp
from lib.cim.runtime import ENVIRONMENT, RUNTIME, Runtime, RuntimeSettingError
from lib.cim.scratch import SCRATCH, scratch_buffers
from lib.search.search import run_search
from lib.training import OptimConfig, Tracker, fit
from search_support import make_int8_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_cli_setup_reads_the_environment_once_and_scopes_it_to_the_job(monkeypatch):
    """The CLIs' set-up refuses a bad value; `cli.run` runs the job under the environment's
    settings (read once: a later change does not reach the kernels) and leaves the process's
    settings as it found them."""
    before = RUNTIME.current
    monkeypatch.setenv("CIM_AQ_COMPILE", "0")
    cli.setup("warning")
    seen = []

    def job():
        seen.append(RUNTIME.current.compile)
        monkeypatch.setenv("CIM_AQ_COMPILE", "1")
        seen.append(RUNTIME.current.compile)
        seen.append(RUNTIME.report())
    assert cli.run(job) == 0
    assert seen[:2] == ["0", "0"]
    assert seen[2]["compile"] == "0" and seen[2]["eager_after_failed_compile"] == []
    assert seen[2]["freed_memory"] == "release" and seen[2]["freed_memory_in_force"] == "release"
    assert RUNTIME.current == before


def test_bad_settings_are_user_errors_naming_the_value():
    with pytest.raises(RuntimeSettingError, match=r"CIM_AQ_COMPILE='yes' is not allowed: expected one of \['auto', '0', '1'\]"):
        Runtime.from_environment({"CIM_AQ_COMPILE": "yes"})
    with pytest.raises(RuntimeSettingError, match=r"CIM_AQ_INTEGER_PRODUCTS='maybe' is not allowed: expected one of \['on', 'off'\]"):
        Runtime.from_environment({"CIM_AQ_INTEGER_PRODUCTS": "maybe"})
    with pytest.raises(RuntimeSettingError, match=r"CIM_AQ_RECOMPILE_LIMIT='0' is not allowed: expected an integer >= 1"):
        Runtime.from_environment({"CIM_AQ_RECOMPILE_LIMIT": "0"})
    with pytest.raises(RuntimeSettingError, match="compile='2' is not allowed"):
        Runtime(compile="2")
    with pytest.raises(RuntimeSettingError, match=r"unknown runtime setting\(s\) \['compile_mode'\]"):
        with RUNTIME.use(compile_mode="0"):
            pass


def test_use_changes_the_settings_inside_its_block_only():
    before = RUNTIME.current
    with RUNTIME.use(compile="0", integer_products=False) as inside:
        assert RUNTIME.current == inside and inside.compile == "0" and not inside.integer_products
        with RUNTIME.use(gradient_products="bfloat16"):
            assert RUNTIME.current.compile == "0" and RUNTIME.current.gradient_products == "bfloat16"
        assert RUNTIME.current == inside
    assert RUNTIME.current == before


def test_cli_with_a_bad_mode_exits_2_with_one_line():
    env = {**os.environ, "CIM_AQ_COMPILE": "fast"}
    done = subprocess.run([sys.executable, "-m", "lib.workflow.report", "--config", "missing.yaml"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: CIM_AQ_COMPILE='fast' is not allowed: expected one of ['auto', '0', '1']"]
    assert "Traceback" not in done.stderr


def test_only_the_runtime_reads_the_kernel_switches():
    """No module of lib/ but lib/cim/runtime.py names a CIM_AQ_ variable, except the documented
    ones: the data cache and the testing hooks (docs/environment.md lists them all)."""
    allowed = {"lib/data/digits.py", "lib/data/loaders.py", "lib/training/kill_switch.py", "lib/search/search.py",
               "lib/cim/runtime.py"}
    naming = {str(path.relative_to(REPO)) for path in (REPO / "lib").rglob("*.py") if "CIM_AQ_" in path.read_text()}
    assert naming <= allowed, sorted(naming - allowed)
    documented = (REPO / "docs" / "environment.md").read_text()
    for variable, _ in ENVIRONMENT.values():
        assert f"`{variable}`" in documented, variable


def _scaled(x, scale):
    return x * scale + 0.25


def test_a_failed_compile_disables_only_that_kernel():
    """A real compile failure (Inductor pointed at a C++ compiler that does not exist) for one
    kernel; the next kernel, compiled with the working compiler, still runs fused."""
    x = torch.randn(64, 8)
    scale = torch.tensor(0.5)
    with RUNTIME.use(compile="auto"):
        with torch._inductor.config.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}):
            out = FusedOp("refuses", _scaled, _scaled)(x, scale)
        assert torch.equal(out, x * 0.5 + 0.25)
        assert RUNTIME.failed == {"refuses"}
        assert RUNTIME.report()["eager_after_failed_compile"] == ["refuses"]
        # another kernel still compiles and runs fused (its into form returns None where it cannot)
        lo, hi = torch.tensor(-8.0), torch.tensor(7.0)
        out = torch.empty_like(x)
        fused = FusedOp("probe", _fused_probe, _fused_probe, into=_fused_probe_into).into(out, x, scale, lo, hi)
        assert fused is out and RUNTIME.failed == {"refuses"}
        assert torch.equal(out, torch.round(x / scale).clamp(-8, 7) * scale)
    assert RUNTIME.failed == frozenset()  # other settings: nothing is known to fail


def _fused_probe(x, scale, lo, hi):
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def _fused_probe_into(out, x, scale, lo, hi):
    out.copy_(_fused_probe(x, scale, lo, hi))
    return out


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


def test_fit_owns_the_scratch_of_its_training_steps(tmp_path):
    """During fit a CIM conv's fused backward takes its partial-sum gradient from scratch (its ADC
    clips most columns, so the slices do not merge); when fit returns the buffers are gone."""
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


def test_the_search_records_the_runtime_and_frees_its_scratch(tmp_path):
    """A tiny real search under given runtime settings: summary.json records them and the routes
    its layers took, and the scratch its finetuning steps used is gone when run_search returns."""
    out = tmp_path / "search"
    with RUNTIME.use(compile="0"):
        run_search(tiny_config(make_int8_checkpoint(tmp_path / "int8"), out, episodes=2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernels"]["compile"] == "0" and summary["kernels"]["eager_after_failed_compile"] == []
    assert summary["kernels"]["freed_memory_in_force"] == "release"
    routes = summary["routes"]
    assert routes and all(entry["forwards"] > 0 for layer in routes.values() for entry in layer)
    assert SCRATCH.buffers == {} and SCRATCH.depth == 0
