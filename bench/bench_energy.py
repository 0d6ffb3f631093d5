"""Energy split of whole networks on the crossbar: uniform 8-bit against a mixed policy of the demo's kind.

Run by hand, not a test (a few seconds; dims are traced, nothing is trained):

    .venv/bin/python bench/bench_energy.py                       # the table below, as markdown
    .venv/bin/python bench/bench_energy.py --json energy.json    # also every figure as JSON

Networks: resnet20 at 32 px (10 classes, the digits demo), resnet18 and vgg16 at 224 px (1000
classes). Hardware: run/hardware/default.yaml (4-bit cells, 8-bit ADCs), cell2bit.yaml (2-bit cells,
6-bit ADCs), and default.yaml with offset mapping for context (one ADC read-out per physical column,
as in ISAAC-style designs, instead of one per differential pair). Policies:

    uniform 8/8     every layer w8/a8, ADCs at the hardware's adc_bits (the ratios' baseline)
    mixed           first and last layer w8/a8; inner layers w 5,4,6,... and a 4,5,6,... in turn
                    (the demo's kind of policy), ADCs at the hardware's adc_bits
    mixed, ADC -2   the mixed policy with inner layers' ADCs 2 bits lower

For each: energy per image, the share of each part (ADC / DAC / array / digital / write), and the
latency, energy, EDP and area ratios to uniform 8/8.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.cim import HardwareConfig  # noqa: E402
from lib.policy import Policy  # noqa: E402
from lib.simulator import CostModel, trace_layer_dims  # noqa: E402
from models import create_model  # noqa: E402

NETWORKS = {"resnet20": (32, 10), "resnet18": (224, 1000), "vgg16": (224, 1000)}
HARDWARE = {"default": ("default.yaml", {}), "cell2bit": ("cell2bit.yaml", {}),
            "default-offset": ("default.yaml", {"mapping": "offset"})}


def policies(names: list[str], adc_bits: int) -> dict[str, Policy]:
    n = len(names)
    w = [8] + [(5, 4, 6)[i % 3] for i in range(n - 2)] + [8]
    a = [8] + [(4, 5, 6)[i % 3] for i in range(n - 2)] + [8]
    lower = [adc_bits] + [adc_bits - 2] * (n - 2) + [adc_bits]
    return {"uniform 8/8": Policy.uniform(names, 8, 8), "mixed": Policy(w, a, None, names),
            "mixed, ADC -2": Policy(w, a, lower, names)}


def measure() -> list[dict]:
    rows = []
    for arch, (size, classes) in NETWORKS.items():
        dims = trace_layer_dims(create_model(arch, classes), size)
        for label, (name, changes) in HARDWARE.items():
            hw = HardwareConfig.from_yaml(ROOT / "run" / "hardware" / name).with_overrides(**changes)
            model = CostModel(hw, dims)
            for policy_name, policy in policies(model.layer_names, hw.adc_bits).items():
                cost = model.policy_cost(policy)
                energy = cost.energy
                rows.append({"network": arch, "input": size, "hardware": label, "policy": policy_name,
                             "energy_uj": energy.energy_pj / 1e6, "shares": energy.shares, "ratios": cost.ratios,
                             "area_mm2": energy.area_mm2, "adc_area_share": energy.adc_area_mm2 / energy.area_mm2})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| network | hardware | policy | energy (µJ/image) | ADC | DAC | array | digital | write | "
             "latency ratio | energy ratio | EDP ratio | area ratio (mm²) |", "|" + "---|" * 13]
    for r in rows:
        s, q = r["shares"], r["ratios"]
        lines.append(f"| {r['network']} {r['input']} px | {r['hardware']} | {r['policy']} | {r['energy_uj']:.2f} | "
                     f"{100 * s['adc']:.1f}% | {100 * s['dac']:.1f}% | {100 * s['array']:.1f}% | "
                     f"{100 * s['digital']:.1f}% | {100 * s['write']:.1f}% | {q['latency']:.3f} | "
                     f"{q['energy']:.3f} | {q['edp']:.3f} | {q['area']:.3f} ({r['area_mm2']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args(argv)
    rows = measure()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
