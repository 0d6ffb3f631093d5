"""Run the two-stage workflow of one experiment YAML: `python -m lib.workflow CONFIG.yaml`.

Stage 1 on the small dataset: FP32 pretraining → uniform INT8 QAT → mixed-precision search →
finetuning → ONNX export → evaluation. Stage 2 on the large dataset (datasets.large.enabled):
FP32 → INT8 → finetuning with stage 1's policy → export → evaluation. Then results.md,
results.json, pareto.png and search.png in the experiment dir (output.root/<prefix>_<model>_<hardware>).

The config is validated before anything runs. A rerun skips finished steps, resumes an
interrupted one from its checkpoint, and reruns a step whose config or inputs changed plus
everything after it. Every key is explained in run/configs/template.yaml.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import yaml

from lib import cli
from lib.fileio import atomic_write

log = logging.getLogger("workflow")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lib.workflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML (see run/configs/template.yaml)")
    p.add_argument("--check", action="store_true", help="only validate the config and list the steps")
    p.add_argument("--until", default=None, metavar="STEP",
                   help="stop after this step (e.g. stage1/search); later steps are left as they are")
    p.add_argument("--log-level", default="INFO", help="logging level of the workflow's own lines")
    return p.parse_args(argv)


def write_hardware(config, path) -> None:
    """The experiment's hardware YAML at `path` (the config's file with its overrides), rewritten only on change."""
    text = yaml.safe_dump(config.hardware.to_dict(), sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda handle: handle.write(text))


def run(args: argparse.Namespace) -> None:
    # lazy: the config schema, steps and runner load torch, which --help and flag errors never need
    from lib.workflow.config import WorkflowConfigError, load_config
    from lib.workflow.runner import Runner
    from lib.workflow.steps import HARDWARE_FILE, build_plan, step_environment

    config = load_config(args.config)
    plan = build_plan(config)
    if args.until is not None:
        names = [step.name for step in plan]
        if args.until not in names:
            raise WorkflowConfigError(f"--until {args.until!r} is not a step of this experiment; steps: {names}")
        plan = plan[:names.index(args.until) + 1]
    log.info("experiment %s: %d steps%s", config.experiment_dir, len(plan),
             "" if config.stage2_enabled else " (stage 2 disabled)")
    if args.check:
        for step in plan:
            log.info("  %-18s → %s", step.name, step.workdir)
        return
    if config.raw.amp.enable:
        log.warning("amp.enable is accepted for CIM-AQ configs but ignored: every stage runs in float32 "
                    "(device.gradient_products: bfloat16 runs the CIM layers' gradient products in bfloat16)")
    write_hardware(config, config.experiment_dir / HARDWARE_FILE)
    Runner(config.experiment_dir, env=step_environment(config)).run(plan)
    if args.until is not None:
        return
    results = config.experiment_dir / "results.md"
    log.info("results: %s", results)
    sys.stdout.write(results.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s workflow: %(message)s",
                        datefmt="%H:%M:%S")
    return cli.run(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
