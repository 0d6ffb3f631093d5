"""The user-facing surface: every CLI answers --help cleanly, the light ones without loading torch,
and the README and docs/ pages link only to files that exist."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (how a user starts it, argv after the interpreter; None for a shell script)
PYTHON_CLIS = {
    "pretrain.py": ["pretrain.py"],
    "finetune.py": ["finetune.py"],
    "rl_quantize.py": ["rl_quantize.py"],
    "python -m lib.workflow": ["-m", "lib.workflow"],
    "python -m lib.export": ["-m", "lib.export"],
    "python -m lib.simulator.latency": ["-m", "lib.simulator.latency"],
    "python -m lib.make_policy": ["-m", "lib.make_policy"],
    "python -m lib.crossbar_eval": ["-m", "lib.crossbar_eval"],
}
SHELL_CLIS = sorted(str(p.relative_to(REPO)) for p in (REPO / "run").glob("run_*.sh"))
# CLIs that parse their flags before importing torch (the others import their stage's modules first)
LIGHT = ["rl_quantize.py", "python -m lib.workflow", "python -m lib.export", "python -m lib.make_policy"]

DRIVER = """
import json, runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, "--help"]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}  # the stage scripts' interpreter
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_every_cli_help_exits_0_with_nothing_on_stderr():
    """Started as users start them (all at once, to keep this quick): exit status 0, a usage text,
    and no warning or log line on stderr."""
    running = {name: _start([sys.executable, *argv, "--help"]) for name, argv in PYTHON_CLIS.items()}
    running.update({script: _start(["bash", script, "--help"]) for script in SHELL_CLIS})
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err)
        assert err == "", (name, err)
        assert "usage" in out.lower(), (name, out[:200])


@pytest.mark.parametrize("name", LIGHT)
def test_light_cli_help_does_not_import_torch(name):
    argv = PYTHON_CLIS[name]
    target = argv[-1] if argv[0] == "-m" else argv[0]
    done = subprocess.run([sys.executable, "-c", DRIVER, target], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False}, (name, done.stderr)


# --------------------------------------------------------------------------- documentation links
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:|#", target)]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_links_the_docs_pages_and_every_local_link_resolves():
    readme_links = {link.split("#")[0] for link in _local_links(REPO / "README.md")}
    docs = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert len(docs) >= 8 and docs <= readme_links, sorted(docs - readme_links)
    for page in PAGES:
        for link in _local_links(page):
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(REPO)} links to {link}, which does not exist"
            if anchor:
                assert anchor in _anchors(path), f"{page.relative_to(REPO)} links to {link}: no such heading"


def test_readme_stays_short():
    assert (REPO / "README.md").stat().st_size <= 10 * 1024
