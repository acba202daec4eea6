"""``mrl plot RUN [RUN ...] [--out FILE.png]``: the learning curves of runs, overlaid, from metrics.jsonl.

One panel per quantity a run logged: the loss with its components (every ``*_loss`` metric),
reward, KL, entropy, learning rate and gradient norm; each run has its own colour, components
their own line style. Needs matplotlib (``pip install 'mrl[plot]'``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# (panel title, the metrics drawn in it); "*_loss" stands for every component of the loss.
PANELS = (
    ("loss", ("loss", "*_loss")),
    ("reward", ("reward_mean",)),
    ("KL", ("kl", "approx_kl")),
    ("entropy", ("entropy",)),
    ("learning rate", ("lr",)),
    ("grad norm", ("grad_norm",)),
)
STYLES = ("-", "--", ":", "-.")


def metrics_file(run: str | Path) -> Path:
    """A run directory's metrics.jsonl, or the file itself."""
    path = Path(run)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (expected a run directory or a metrics.jsonl file)")
    return file


def read_curves(file: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] for every finite numeric metric of every record."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}:{number}: invalid JSON ({exc.msg})") from exc
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def _panel_keys(patterns: tuple[str, ...], available: set[str]) -> list[str]:
    keys = []
    for pattern in patterns:
        if pattern.startswith("*"):
            keys += sorted(k for k in available if k.endswith(pattern[1:]) and k not in keys)
        elif pattern in available:
            keys.append(pattern)
    return keys


def plot_runs(runs: list[str | Path], out: str | Path) -> list[str]:
    """Draw the curves of ``runs`` into ``out`` (PNG); returns the titles of the panels drawn."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("mrl plot needs matplotlib: pip install 'mrl[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(str(run), read_curves(metrics_file(run))) for run in runs]
    available = set().union(*(curves for _, curves in data))
    panels = [(title, _panel_keys(patterns, available)) for title, patterns in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"no metrics to plot in {', '.join(str(r) for r in runs)}")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (title, keys) in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for number, (run, curves) in enumerate(data):
            for style, key in zip(STYLES * len(keys), keys):
                if key in curves:
                    steps, values = zip(*curves[key])
                    label = (run if len(data) > 1 else "") + (f" {key}" if len(keys) > 1 else "")
                    axis.plot(steps, values, style, color=colours[number % len(colours)], label=label.strip() or None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if title in ("learning rate", "grad norm") or title == "KL":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return [title for title, _ in panels]
