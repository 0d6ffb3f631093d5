"""Policy files: CIM-AQ .npy and our .json, validation, and the make_policy CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.make_policy import build_policy
from lib.policy import Policy, PolicyError

ROOT = Path(__file__).resolve().parents[1]


def test_save_writes_npy_and_json_that_load_back(tmp_path):
    policy = Policy([8, 4, 6], [8, 5, 4], [6, 5, 7], ["conv1", "layer1.conv", "fc"], meta={"accuracy": 91.5})
    npy, js = policy.save(tmp_path / "policy")
    array = np.load(npy)
    assert array.dtype.kind == "i" and array.tolist() == [[8, 8, 6], [4, 5, 5], [6, 4, 7]]
    again = Policy.load(js)
    assert (again.w_bits, again.a_bits, again.adc_bits, again.layer_names) == (
        policy.w_bits, policy.a_bits, policy.adc_bits, policy.layer_names)
    assert again.meta["accuracy"] == 91.5
    assert Policy.load(npy).w_bits == [8, 4, 6]


def test_cim_aq_npy_loads(tmp_path):
    np.save(tmp_path / "qresnet18_w4a4.npy", [[8, 8]] + [[4, 4]] * 19 + [[8, 8]])
    policy = Policy.load(tmp_path / "qresnet18_w4a4.npy")
    assert len(policy) == 21 and policy.adc_bits is None and policy.layer_names is None


@pytest.mark.parametrize("content,pattern", [
    (np.array([4, 4, 4]), r"has shape \(3,\); expected \(layers, 2\) or \(layers, 3\)"),
    (np.array([[4.5, 4]]), "non-integer bit widths"),
    (np.array([[0, 4]]), "layer 0: w_bit=0 is not allowed"),
])
def test_malformed_npy_is_refused(tmp_path, content, pattern):
    np.save(tmp_path / "p.npy", content)
    with pytest.raises(PolicyError, match=pattern):
        Policy.load(tmp_path / "p.npy")


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "missing.npy")
    (tmp_path / "p.txt").write_text("8,8")
    with pytest.raises(PolicyError, match="unknown extension '.txt'"):
        Policy.load(tmp_path / "p.txt")
    (tmp_path / "p.json").write_text(json.dumps({"layers": [{"w_bit": 4}]}))
    with pytest.raises(PolicyError, match="need 'layers' with 'w_bit'/'a_bit'"):
        Policy.load(tmp_path / "p.json")


def test_check_matches_refuses_wrong_length_and_names():
    policy = Policy([4, 4], [4, 4], layer_names=["a", "b"])
    policy.check_matches(["a", "b"])
    with pytest.raises(PolicyError, match="policy has 2 layers but the model has 3"):
        policy.check_matches(["a", "b", "c"])
    with pytest.raises(PolicyError, match="policy layer 1 is 'b' but the model's layer 1 is 'x'"):
        policy.check_matches(["a", "x"])


def test_build_policy_first_last_and_per_layer():
    policy = build_policy(["a", "b", "c"], 4, 5, adc_bits=6, first_last=(8, 8))
    assert policy.w_bits == [8, 4, 8] and policy.a_bits == [8, 5, 8] and policy.adc_bits == [6, 6, 6]
    assert build_policy(["a", "b"], 4, 4, per_layer="8:6, 3:2").w_bits == [8, 3]
    with pytest.raises(PolicyError, match="2 entries but the model has 3"):
        build_policy(["a", "b", "c"], 4, 4, per_layer="8:6,3:2")


def test_make_policy_cli_writes_files_in_call_order(tmp_path):
    out = tmp_path / "resnet20_w4a4"
    done = subprocess.run([sys.executable, "-m", "lib.make_policy", "--arch", "resnet20", "--w-bit", "4",
                           "--a-bit", "4", "--first-last", "8", "8", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    policy = Policy.load(out.with_suffix(".json"))
    assert len(policy) == 20 and policy.layer_names[0] == "conv1" and policy.layer_names[-1] == "fc"
    assert policy.w_bits[0] == policy.w_bits[-1] == 8 and set(policy.w_bits[1:-1]) == {4}
    bad = subprocess.run([sys.executable, "-m", "lib.make_policy", "--arch", "resnet2", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "close matches: resnet32, resnet20" in bad.stderr
