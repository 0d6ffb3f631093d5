"""The freed-memory policy (lib.heap): with `keep` a large tensor allocated again after it was
freed takes over the same memory without page faults; with `release` (glibc's behaviour) its
pages are faulted in again. Each case runs in a fresh interpreter: the policy is process-wide."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.cim.runtime import Runtime
from lib.heap import HeapPolicyError, _glibc, configure_heap, heap_policy

REPO = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the policy is set through glibc's mallopt")

# allocate, touch and free a 64 MiB tensor over and over; report the page faults and the growth of
# resident memory over the last 8 times (the first 16 let the heap settle: a block freed just
# below a small allocation is reused once its neighbours are free too)
PROBE = """
import json, resource, sys, torch
{setup}
def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096
def allocate_and_free(times):
    for _ in range(times):
        t = torch.empty(64 * 2**20, dtype=torch.uint8)
        t.fill_(1)
        del t
allocate_and_free(16)
faults, low = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, resident()
allocate_and_free(8)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"policy": policy, "faults": faults, "growth": resident() - low}}))
"""


def probe(setup: str, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("CIM_AQ_FREED_MEMORY", "GLIBC_TUNABLES")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


PAGES = 64 * 2**20 // 4096


@needs_glibc
def test_kept_memory_is_reused_without_page_faults():
    kept = probe("from lib.heap import configure_heap\npolicy = configure_heap('keep')")
    released = probe("from lib.heap import configure_heap\npolicy = configure_heap('release')")
    assert kept["policy"] == "keep" and released["policy"] == "release"
    assert kept["faults"] < PAGES // 4 and kept["growth"] < 2**20  # freed blocks taken over, not faulted in again
    assert released["faults"] > 4 * PAGES  # a fresh mapping each time: every page faulted in again


@needs_glibc
def test_the_cli_setup_keeps_freed_memory_unless_told_otherwise():
    setup = "from lib import cli\ncli.setup('warning')\nfrom lib.heap import heap_policy\npolicy = heap_policy()"
    assert probe(setup)["policy"] == "keep"
    released = probe(setup, CIM_AQ_FREED_MEMORY="release")
    assert released["policy"] == "release" and released["faults"] > 4 * PAGES


@needs_glibc
def test_glibcs_own_settings_win():
    """A user who set glibc's own variables for these knobs chose the policy: `keep` leaves them in
    force. A tunable of another knob does not count."""
    keep = "from lib.heap import configure_heap\npolicy = configure_heap('keep')"
    for setting in (dict(MALLOC_MMAP_THRESHOLD_="131072"),
                    dict(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")):
        result = probe(keep, **setting)
        assert result["policy"] == "glibc environment" and result["faults"] > 4 * PAGES
    assert probe(keep, GLIBC_TUNABLES="glibc.malloc.tcache_count=0")["policy"] == "keep"


def test_a_bad_policy_is_refused_by_name():
    with pytest.raises(HeapPolicyError, match=r"freed memory='always' is not allowed: expected one of \['keep', 'release'\]"):
        configure_heap("always")
    with pytest.raises(ValueError, match=r"CIM_AQ_FREED_MEMORY='hold' is not allowed"):
        Runtime.from_environment({"CIM_AQ_FREED_MEMORY": "hold"})
    assert heap_policy() == "release"  # nothing was applied


def test_a_bad_policy_stops_a_cli_before_its_work():
    env = dict(os.environ, CIM_AQ_FREED_MEMORY="hold")
    done = subprocess.run([sys.executable, "finetune.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "CIM_AQ_FREED_MEMORY='hold' is not allowed: expected one of ['keep', 'release']" in done.stderr
