"""Output writers: the stdout table, the CSV and the speedup plot."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One variant at one grid point: median and best time, and speedups of medians (other / this)."""

    prompt_len: int
    completion_len: int
    group_size: int
    variant: str
    time_ms: float
    best_ms: float
    peak_mib: float
    speedup_vs_baseline: float
    speedup_vs_hf: float
    speedup_vs_peer: float
    flop_limit: float
    pct_of_limit: float


COLUMNS = [f.name for f in fields(Row)]
_HEADER = ("P", "S", "G", "variant", "median ms", "best ms", "peak MiB", "x baseline", "x hf_sdpa", "x peer", "FLOP limit", "% of limit")


def _cell(x) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def format_table(rows: list[Row]) -> str:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(_cell(v) for v in asdict(r).values()) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    """One CSV line per row, columns as `Row`'s fields."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_csv(path: Path) -> list[Row]:
    """Rows back from `write_csv`'s file."""
    types = {f.name: f.type for f in fields(Row)}
    cast = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        return [Row(**{k: cast[types[k]](v) for k, v in line.items()}) for line in csv.DictReader(f)]


def plot_speedup(rows: list[Row], path: Path, title: str) -> None:
    """Speedup over the baseline against G, one colour per (P, S); the FLOP limit as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r.prompt_len, r.completion_len) for r in rows})
    styles = {"ours": "-o", "peer": "--s", "hf_sdpa": "-.^"}
    for i, (P, S) in enumerate(keys):
        colour = f"C{i}"
        at = sorted((r for r in rows if (r.prompt_len, r.completion_len) == (P, S)), key=lambda r: r.group_size)
        limit = {r.group_size: r.flop_limit for r in at}
        ax.plot(list(limit), list(limit.values()), ":", color=colour, label=f"FLOP limit P={P} S={S}")
        for variant, style in styles.items():
            pts = [(r.group_size, r.speedup_vs_baseline) for r in at if r.variant == variant]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"{variant} P={P} S={S}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("group size G")
    ax.set_ylabel("speedup over the baseline (x)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
