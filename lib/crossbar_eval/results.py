"""A sweep's results on disk: sweep.json (the record a resumed or extended sweep reads), sweep.csv,
sweep.md and sweep.png, all rewritten atomically after every finished point.

sweep.json holds the run's fingerprint (checkpoint digest, base hardware and bits, data and
calibration settings) and one row per point ever finished, keyed by the point's swept values
(and repeats, for a noisy point). A rerun with the same fingerprint reuses every row whose key
it asks for and computes only the others; one with another fingerprint is refused.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from lib.crossbar_eval.grid import Axis, Point, SweepError  # noqa: E402
from lib.fileio import atomic_write, atomic_write_json  # noqa: E402

log = logging.getLogger(__name__)

FORMAT = 1
RESULT_COLUMNS = ("noise", "repeats", "top1_mean", "top1_std", "latency_ratio", "latency_us", "energy_pj",
                  "energy_ratio", "arrays", "recalibrated_layers", "seconds")


def row_key(point: Point, repeats: int) -> str:
    return json.dumps({"point": point.as_dict, "repeats": repeats}, sort_keys=True)


def make_row(point: Point, repeats: int, result) -> dict:
    top1 = list(result.top1)
    return {"key": row_key(point, repeats), **point.as_dict, "noise": result.noise, "repeats": len(top1),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "top1": top1, **result.cost, "recalibrated_layers": result.recalibrated,
            "seconds": round(result.seconds, 3)}


class SweepStore:
    """The rows of one sweep folder, written through after every point."""

    def __init__(self, folder: Path, fingerprint: dict, axes: list[Axis], rows: Optional[dict] = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.axes = axes
        self.rows = dict(rows or {})

    @property
    def json_path(self) -> Path:
        return self.folder / "sweep.json"

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, axes: list[Axis], resume: bool, overwrite: bool) -> "SweepStore":
        """The folder's store: its rows when resuming a sweep of the same fingerprint; a refusal
        when it holds a sweep and neither --resume auto nor --overwrite was given."""
        path = Path(folder) / "sweep.json"
        if not path.exists() or (overwrite and not resume):
            return cls(folder, fingerprint, axes)
        if not resume:
            raise SweepError(f"--output-dir {folder} already holds a sweep (sweep.json); pass --resume auto to "
                             f"continue or extend it, --overwrite to replace it, or choose another --output-dir")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SweepError(f"{path} cannot be resumed: {err}") from None
        if data.get("format") != FORMAT:
            raise SweepError(f"{path} has format {data.get('format')!r}, expected {FORMAT}")
        old = data.get("fingerprint", {})
        differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if differ:
            raise SweepError(f"{path} is a sweep of another setting (differs in {differ}); --resume auto continues "
                             f"only the same checkpoint, base hardware, bits, data and calibration; use --overwrite "
                             f"or another --output-dir")
        return cls(folder, fingerprint, axes, {row["key"]: row for row in data.get("rows", [])})

    def get(self, point: Point, repeats: int) -> Optional[dict]:
        return self.rows.get(row_key(point, repeats))

    def add(self, row: dict, grid_rows: list[dict]) -> None:
        """Record a finished point and rewrite every table (plot at `finish`)."""
        self.rows[row["key"]] = row
        self.write_tables(grid_rows)

    # ------------------------------------------------------------ files
    def write_tables(self, grid_rows: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.json_path, {"format": FORMAT, "fingerprint": self.fingerprint,
                                           "axes": [{"key": a.key, "values": list(a.values), "noise": a.noise}
                                                    for a in self.axes],
                                           "rows": list(self.rows.values())}, indent=1)
        swept = [a.key for a in self._ordered_axes()]
        columns = swept + [c for c in RESULT_COLUMNS if c not in swept]  # a swept `noise` preset is the noise column
        atomic_write(self.folder / "sweep.csv", lambda h: h.write(csv_text(grid_rows, columns)))
        atomic_write(self.folder / "sweep.md", lambda h: h.write(markdown_text(grid_rows, columns, self.fingerprint)))

    def finish(self, grid_rows: list[dict]) -> None:
        self.write_tables(grid_rows)
        plot_sweep(grid_rows, self._ordered_axes(), self.folder / "sweep.png")

    def _ordered_axes(self) -> list[Axis]:
        return [a for a in self.axes if not a.noise] + [a for a in self.axes if a.noise]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return out.getvalue()


def markdown_text(rows: list[dict], columns: list[str], fingerprint: dict) -> str:
    head = [f"# Crossbar sweep of {fingerprint.get('checkpoint')}", "",
            f"Test split of {fingerprint.get('dataset')} ({fingerprint.get('test_images')} images); "
            f"steps recalibrated on {fingerprint.get('calibration_batches')} training batch(es) where a point "
            f"changes the crossbar or the bits. `noise`: the device non-idealities each accuracy was measured "
            f"under (`ideal`: none); top1_mean ± top1_std over `repeats` seeded programmings (one for ideal). "
            f"latency_ratio: against uniform 8/8-bit on the same hardware.", ""]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(head + lines) + "\n"


def plot_sweep(rows: list[dict], axes: list[Axis], path: Path) -> None:
    """One panel per pair of swept keys (heat-map of top1_mean, averaged over the other keys), or a
    line plot (mean ± std) when one key is swept."""
    swept = [a for a in axes if len(a.values) > 1]
    if not rows:
        return
    pairs = list(itertools.combinations(swept, 2))
    panels = max(1, len(pairs))
    cols = min(panels, 3)
    fig, grid = plt.subplots(math.ceil(panels / cols), cols, figsize=(5 * cols, 4 * math.ceil(panels / cols)),
                             squeeze=False)
    if len(swept) < 2:
        ax = grid[0][0]
        key = swept[0].key if swept else None
        labels = [str(r.get(key)) if key else "point" for r in rows]
        ax.errorbar(range(len(rows)), [r["top1_mean"] for r in rows], yerr=[r["top1_std"] for r in rows],
                    marker="o", capsize=3)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_xlabel(key or "")
        ax.set_ylabel("test top-1 (%)")
    for ax, (a, b) in zip(grid.flat, pairs):
        table = [[_mean([r["top1_mean"] for r in rows if r.get(a.key) == va and r.get(b.key) == vb])
                  for va in a.values] for vb in b.values]
        image = ax.imshow(table, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(a.values)), [str(v) for v in a.values])
        ax.set_yticks(range(len(b.values)), [str(v) for v in b.values])
        ax.set_xlabel(a.key)
        ax.set_ylabel(b.key)
        for i, line in enumerate(table):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(image, ax=ax, label="test top-1 (%)")
    for ax in list(grid.flat)[len(pairs) if pairs else 1:]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=100), binary=True)
    plt.close(fig)


def _mean(values: list) -> float:
    return statistics.fmean(values) if values else float("nan")
