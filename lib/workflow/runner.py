"""Run a plan of steps: skip finished ones, resume an interrupted one, rerun what changed and what follows.

A step's fingerprint hashes its argv (experiment paths made relative), its config settings, the
contents of its user-provided inputs and the run tokens of the steps it depends on. A finished
step leaves a record `<experiment>/.workflow/<step>.json` with that fingerprint and a fresh token;
a step is skipped when its record matches and its outputs exist. Every rerun issues a new token,
so whatever depends on it reruns too. A step that was started under the same fingerprint but
never finished is resumed (its CLI gets `--resume auto` and finds its checkpoint); any other
rerun starts from an empty step folder.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lib.distributed import torchrun_command
from lib.errors import UserError
from lib.fileio import atomic_write_json
from lib.workflow.config import REPO_ROOT
from lib.workflow.steps import Step

log = logging.getLogger("workflow")
STATE_DIR = ".workflow"


class StepFailed(UserError):
    """A step's command exited with an error; its own output above says why."""


@dataclass
class StepOutcome:
    name: str
    state: str  # skipped | resumed | running (ran from scratch)
    seconds: float


def file_digest(path: Path) -> str:
    """sha256 of a file's contents ('missing' when it does not exist yet)."""
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Runner:
    """Runs steps in order inside one experiment directory."""

    def __init__(self, experiment_dir: Path, python: str = sys.executable, env: Optional[dict] = None) -> None:
        """env: extra environment variables of every step (e.g. CUDA_VISIBLE_DEVICES)."""
        self.experiment_dir = Path(experiment_dir)
        self.env = {**os.environ, **(env or {})}
        self.state_dir = self.experiment_dir / STATE_DIR
        self.python = python
        self.tokens: dict[str, str] = {}

    # ------------------------------------------------------------ records
    def record_path(self, step: Step) -> Path:
        return self.state_dir / (step.name.replace("/", "__") + ".json")

    def read_record(self, step: Step) -> Optional[dict]:
        path = self.record_path(step)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def fingerprint(self, step: Step, produced: set[Path]) -> str:
        """Hash of what determines the step's result (see the module docstring)."""
        exp = str(self.experiment_dir)
        argv = [arg.replace(exp, "<experiment>") for arg in step.argv]
        inputs = {str(p).replace(exp, "<experiment>"): file_digest(p) for p in step.inputs if p not in produced}
        upstream = {name: self.tokens.get(name, "") for name in step.depends}
        what = {"argv": argv, "settings": step.settings, "inputs": inputs, "upstream": upstream}
        if step.processes > 1:  # the batch grows with the processes (one process keeps earlier fingerprints)
            what["processes"] = step.processes
        payload = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    # ------------------------------------------------------------ running
    def command(self, step: Step) -> list[str]:
        """The step's command line: this Python, or torchrun with step.processes processes."""
        if step.processes > 1:
            return torchrun_command(step.argv[0], [*step.argv[1:], *step.runtime_args], step.processes, self.python)
        return [self.python, *step.argv, *step.runtime_args]

    def run(self, plan: list[Step]) -> list[StepOutcome]:
        """Run (or skip) every step; raises StepFailed at the first failing step."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        produced = {path for step in plan for path in step.output_paths()}
        outcomes = []
        for index, step in enumerate(plan, 1):
            outcome = self.run_step(step, self.fingerprint(step, produced), f"[{index}/{len(plan)}]")
            outcomes.append(outcome)
        return outcomes

    def run_step(self, step: Step, fingerprint: str, counter: str) -> StepOutcome:
        record = self.read_record(step)
        if (record and record.get("status") == "done" and record.get("fingerprint") == fingerprint
                and all(p.is_file() for p in step.output_paths())):
            self.tokens[step.name] = record["token"]
            log.info("%s %-18s skipped  (finished earlier in %.1f s)", counter, step.name, record.get("seconds", 0))
            return StepOutcome(step.name, "skipped", 0.0)
        resume = (step.resumable and record is not None and record.get("status") == "started"
                  and record.get("fingerprint") == fingerprint and step.workdir.is_dir())
        state = "resumed" if resume else "running"
        if step.owns_workdir and not resume and step.workdir.is_dir():
            shutil.rmtree(step.workdir)  # a changed or repeated step starts from an empty folder
        step.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path(step), {"status": "started", "fingerprint": fingerprint,
                                                   "argv": list(step.argv)})
        log.info("%s %-18s %s ...", counter, step.name, state)
        started = time.time()
        command = self.command(step)
        returncode = self.execute(step, command)
        seconds = time.time() - started
        if returncode != 0:
            raise StepFailed(f"step {step.name} failed (exit status {returncode}) after {seconds:.1f} s; "
                             f"rerun the workflow to resume it. Command: {' '.join(command)}")
        missing = [str(p) for p in step.output_paths() if not p.is_file()]
        if missing:
            raise StepFailed(f"step {step.name} finished but did not write {missing}")
        token = uuid.uuid4().hex
        self.tokens[step.name] = token
        atomic_write_json(self.record_path(step), {"status": "done", "fingerprint": fingerprint, "token": token,
                                                   "seconds": round(seconds, 2), "state": state,
                                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                   "argv": list(step.argv)})
        log.info("%s %-18s %s, done in %.1f s", counter, step.name, state, seconds)
        return StepOutcome(step.name, state, seconds)

    def execute(self, step: Step, command: list[str]) -> int:
        """Run the step's command; exit status (an in-process step's uncaught exception counts as 1).

        An in-process step runs on the CPU with the runner's environment (it needs no GPU)."""
        if not step.in_process:
            return subprocess.run(command, cwd=REPO_ROOT, env=self.env).returncode
        if step.argv[0] != "-m":
            raise ValueError(f"in-process step {step.name} must be `-m module ...`, got {step.argv[:2]}")
        try:
            return importlib.import_module(step.argv[1]).main([*step.argv[2:], *step.runtime_args])
        except SystemExit as stop:  # e.g. argparse or cli.setup refusing a value: the exit status it chose
            return stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001 - a bug in the step: report it like a crashed subprocess
            log.exception("step %s raised", step.name)
            return 1


def step_seconds(experiment_dir: Path) -> dict[str, float]:
    """Wall time of every finished step recorded in an experiment dir (step name → seconds)."""
    out = {}
    for path in sorted((Path(experiment_dir) / STATE_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") == "done":
            out[path.stem.replace("__", "/")] = record.get("seconds", 0.0)
    return out
