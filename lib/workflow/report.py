"""The report step: results.json, results.md, pareto.png and search.png in the experiment dir.

Run by the workflow as `python -m lib.workflow.report --config EXPERIMENT.yaml`; reads each
stage's evaluation.json, the search's episodes.jsonl / summary.json and the step records.
The explored-policies plot has one panel per objective on its x axis (`--pareto`, default
latency and energy side by side; an objective the episodes have no figures for is left out).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lib import cli  # noqa: E402
from lib.fileio import atomic_write, atomic_write_json  # noqa: E402
from lib.objectives import OBJECTIVES  # noqa: E402
from lib.workflow.config import load_config  # noqa: E402
from lib.workflow.runner import step_seconds  # noqa: E402
from lib.workflow.steps import build_plan, stage_dirs  # noqa: E402


DEFAULT_PARETO = ("latency", "energy")
AXIS_LABELS = {"latency": "latency ratio vs uniform 8-bit (lower is faster)",
               "energy": "energy ratio vs uniform 8-bit (lower uses less)",
               "edp": "energy-delay product ratio vs uniform 8-bit", "area": "area ratio vs uniform 8-bit"}


def read_episodes(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(value) -> str:
    return "–" if value is None else f"{value:.2f}%"


def energy_markdown(ev: dict) -> list[str]:
    """The energy, EDP and area lines of a stage (or that the hardware has no energy model)."""
    energy = ev.get("energy")
    if not energy:
        return ["- energy and area: unavailable (the hardware YAML has no `energy` section)"]
    split = ", ".join(f"{part} {100 * share:.1f}%" for part, share in energy["shares"].items())
    return [f"- energy ratio vs uniform 8-bit: **{energy['energy_ratio']:.4f}** ({energy['energy_pj'] / 1e6:.3f} µJ "
            f"vs {energy['baseline_energy_pj'] / 1e6:.3f} µJ per image; {split})",
            f"- EDP ratio {energy['edp_ratio']:.4f}; area ratio {energy['area_ratio']:.4f} "
            f"({energy['area_mm2']:.3f} mm²: arrays {energy['array_area_mm2']:.3f}, {energy['adcs']} ADCs "
            f"{energy['adc_area_mm2']:.3f})"]


def stage_markdown(label: str, title: str, ev: dict, seconds: dict[str, float]) -> list[str]:
    """The results.md section of one stage (`seconds`: wall time per step, in plan order)."""
    adc = any(row["adc_bits"] is not None for row in ev["policy"])
    energy = bool(ev.get("energy"))
    lines = [f"## {title}: {ev['dataset']} ({ev['arch']}, {ev['input_size']} px)", "",
             "| model | test top-1 |", "|---|---|",
             f"| FP32 | {_pct(ev['fp32_test_top1'])} |", f"| uniform INT8 | {_pct(ev['int8_test_top1'])} |",
             f"| mixed precision | {_pct(ev['mixed_test_top1'])} |",
             f"| mixed precision, deployed (bit-serial inputs) | {_pct(ev.get('mixed_deployed_top1'))} |", "",
             f"- latency ratio vs uniform 8-bit: **{ev['latency_ratio']:.4f}** (speed-up **{ev['speedup']:.2f}×**; "
             f"{ev['latency_us']:.1f} µs vs {ev['baseline_latency_us']:.1f} µs per image)",
             f"- accuracy constraint (at most {ev['max_accuracy_drop']:g} pp below INT8): "
             f"{'met' if ev['accuracy_constraint_met'] else 'NOT met'} (drop {ev['accuracy_drop_vs_int8']:+.2f} pp)",
             *energy_markdown(ev),
             f"- ONNX: `{ev['onnx']}`, onnxruntime top-1 agreement {ev['ort_top1_agreement']:.4f} on "
             f"{ev['ort_images']} images (max |Δlogit| {ev['ort_max_abs_diff']:.3g})"]
    for field, sides in (ev.get("hardware_priced_vs_simulated") or {}).items():
        lines.append(f"- {field}: priced {sides['priced']}, simulated in training {sides['simulated']}")
    search = ev.get("search")
    if search:
        best = search.get("best") or {}
        seconds_taken = search.get("seconds")
        wall = f" in {seconds_taken:.1f} s" if isinstance(seconds_taken, (int, float)) else ""
        free = search.get("free_decisions") or []
        lines.append(f"- search strategy: **{search.get('strategy', 'ddpg')}**{wall}"
                     + (f"; {len(free)} free decisions held at their highest bits" if free else ""))
        lines.append(f"- search: {search.get('episodes_run')} episodes, INT8 baseline on the search split "
                     f"{_pct(search.get('baseline_accuracy'))}, target {_pct(search.get('target_accuracy'))}, "
                     f"best episode {best.get('episode')} ({_pct(best.get('accuracy'))}, latency ratio "
                     f"{best.get('latency_ratio', float('nan')):.4f}"
                     + (f", {best['objective']} ratio {best['objective_ratio']:.4f}"
                        if best.get("objective") not in (None, "latency") else "") + ")")
    header = ("| # | layer | w | a |" + (" adc |" if adc else "") + " row-tiles | share of latency |"
              + (" share of energy | ADC share of its energy |" if energy else ""))
    lines += ["", header, "|" + "---|" * (header.count("|") - 1)]
    for i, row in enumerate(ev["policy"]):
        adc_cell = f" {row['adc_bits']} |" if adc else ""
        energy_cells = (f" {100 * row['energy_share']:.1f}% | {100 * row['adc_energy_share']:.1f}% |"
                        if energy else "")
        lines.append(f"| {i} | {row['layer']} | {row['w_bit']} | {row['a_bit']} |{adc_cell} {row['row_tiles']} | "
                     f"{100 * row['latency_share']:.1f}% |{energy_cells}")
    lines += ["", "| step | wall time |", "|---|---|"]
    lines += [f"| {step} | {secs:.1f} s |" for step, secs in seconds.items() if step.startswith(label + "/")]
    return lines + [""]


def pareto_objectives(names: str) -> tuple:
    """The objectives of a comma list ('latency,energy'), each one of OBJECTIVES."""
    chosen = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in chosen if name not in OBJECTIVES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{names!r}: expected a comma list of {', '.join(OBJECTIVES)}")
    return chosen


def plot_pareto(episodes: list[dict], summary: dict, path: Path, objectives: tuple = DEFAULT_PARETO) -> None:
    """Every explored policy (search-split accuracy vs each objective's ratio, one panel each), INT8
    baseline, target, choice. Objectives without figures in the episodes (no energy model) are left out."""
    episodes = [e for e in episodes if e.get("accuracy") is not None]  # a diverged policy has no accuracy
    shown = [name for name in objectives if any(e.get(f"{name}_ratio") is not None for e in episodes)]
    shown = shown or ["latency"]
    fig, axes = plt.subplots(1, len(shown), figsize=(7 * len(shown), 5), dpi=120, sharey=True, squeeze=False)
    feasible = [e for e in episodes if e.get("feasible", True)]
    infeasible = [e for e in episodes if not e.get("feasible", True)]
    baseline, target = summary.get("baseline_accuracy"), summary.get("target_accuracy")
    best = summary.get("best") or {}
    for ax, name in zip(axes[0], shown):
        key = f"{name}_ratio"
        for group, style, label in ((feasible, dict(c="tab:blue"), "explored (meets the constraints)"),
                                    (infeasible, dict(c="tab:gray", marker="x"), "explored (misses a constraint)")):
            points = [e for e in group if e.get(key) is not None]
            if points:
                ax.scatter([e[key] for e in points], [e["accuracy"] for e in points], s=22, alpha=0.7,
                           label=label, **style)
        if baseline is not None:
            ax.scatter([1.0], [baseline], marker="s", s=60, c="black", label=f"uniform INT8 ({baseline:.1f}%)",
                       zorder=3)
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", label=f"accuracy target ({target:.1f}%)")
        if best.get(key) is not None:
            ax.scatter([best[key]], [best["accuracy"]], marker="*", s=260, c="gold", edgecolors="black",
                       label=f"chosen (episode {best.get('episode')})", zorder=4)
        ax.set_xlabel(AXIS_LABELS[name])
        ax.set_title(f"Explored policies: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("top-1 accuracy on the search split (%)")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"), binary=True)
    plt.close(fig)


def plot_search(episodes: list[dict], path: Path) -> None:
    """Reward per episode, and the accuracy / speed-up of the best policy so far: the highest reward
    among those meeting the constraints, or among all while none does (as the search picks)."""
    fig, (ax_r, ax_b) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True)
    xs = [e["episode"] for e in episodes]
    ax_r.plot(xs, [e["reward"] for e in episodes], ".-", c="tab:purple", lw=1, ms=4)
    ax_r.set_ylabel("reward")
    ax_r.set_title("Search progress")
    ax_r.grid(alpha=0.3)
    best_acc, best_speed, best_feasible, best_any = [], [], None, None
    for e in episodes:
        if e.get("feasible", True) and (best_feasible is None or e["reward"] > best_feasible["reward"]):
            best_feasible = e
        if best_any is None or e["reward"] > best_any["reward"]:
            best_any = e
        best = best_feasible or best_any
        best_acc.append(math.nan if best["accuracy"] is None else best["accuracy"])  # None: it diverged
        best_speed.append(1 / best["latency_ratio"])
    ax_b.step(xs, best_acc, where="post", c="tab:blue")
    ax_b.set_ylabel("its top-1 on search split (%)", color="tab:blue")
    ax_b.set_xlabel("episode")
    ax_b.set_title("best policy so far (highest reward, constraint-meeting policies first)", fontsize=9)
    ax_b.grid(alpha=0.3)
    ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_s = ax_b.twinx()
    ax_s.step(xs, best_speed, where="post", c="tab:orange", linestyle="--")
    ax_s.set_ylabel("its speed-up vs uniform 8-bit (×)", color="tab:orange")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"), binary=True)
    plt.close(fig)


def write_report(config_path: str, pareto: tuple = DEFAULT_PARETO) -> dict:
    """Write the four result files (`pareto`: the objectives of the explored-policies panels); returns
    results.json's content."""
    config = load_config(config_path)
    exp = config.experiment_dir
    recorded = step_seconds(exp)
    seconds = {step.name: recorded[step.name] for step in build_plan(config) if step.name in recorded}
    stages = {label: json.loads((folder / "evaluation" / "evaluation.json").read_text())
              for label, folder in stage_dirs(config).items()}
    search_dir = stage_dirs(config)["stage1"] / "search"
    episodes = read_episodes(search_dir / "episodes.jsonl")
    summary = json.loads((search_dir / "summary.json").read_text())
    results = {"experiment": str(exp), "config": str(config.source), "hardware": config.hardware.to_dict(),
               "stages": stages, "step_seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
               "figures": {"pareto": str(exp / "pareto.png"), "search": str(exp / "search.png")}}
    atomic_write_json(exp / "results.json", results)
    lines = [f"# Results: {exp.name}", "", f"Config `{config.source}`, hardware `{config.raw.hardware.config}`.", ""]
    titles = {"stage1": "Stage 1 (search)", "stage2": "Stage 2 (large dataset)"}
    for label, ev in stages.items():
        lines += stage_markdown(label, titles[label], ev, seconds)
    lines += [f"Total wall time of all steps: {results['total_seconds']:.1f} s.", "",
              "![explored policies](pareto.png)", "", "![search progress](search.png)", ""]
    atomic_write(exp / "results.md", lambda handle: handle.write("\n".join(lines)))
    plot_pareto(episodes, summary, exp / "pareto.png", pareto)
    plot_search(episodes, exp / "search.png")
    return results


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment YAML")
    p.add_argument("--pareto", type=pareto_objectives, default=DEFAULT_PARETO, metavar="NAME[,NAME]",
                   help=f"objectives on the x axes of pareto.png, one panel each: {', '.join(OBJECTIVES)} "
                        f"(default: latency,energy)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cli.setup(args.log_level)
    return cli.run(lambda: write_report(args.config, args.pareto))


if __name__ == "__main__":
    sys.exit(main())
