"""``hjepa compare``: the runs of an MLflow experiment side by side.

Runs come from ``mlflow.search_runs`` (through :mod:`hjepa_core.tracking`) at whatever tracking
URI is set. Each pretraining run becomes one row, joined with the metrics of its newest
evaluation run (an ``hjepa evaluate`` child run, tag ``hjepa.stage=evaluate``); evaluation runs
without a pretraining run in the experiment get rows of their own. The table shows the config
keys whose values differ between rows (bookkeeping keys such as output directories and
``tracking.*`` left out) and the key metrics, sorted by the chosen metric; curves of every
row's training metrics go to one PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hjepa_core.tracking import RunRecord, metric_history, search_runs
from hjepa_core.utils import atomic_write_text

KEY_METRICS = ("probe_top1", "knn_top1", "random_init_probe_top1", "pixels_probe_top1", "final_loss",
               "knn_monitor/top1")
CURVES = ("loss", "knn_monitor/top1")
_BOOKKEEPING = ("tracking.", "training.output_dir", "data.data_path", "eval.output_dir", "eval.cache_dir",
                "eval.progress", "eval.use_cache", "eval.device", "eval.tracking", "eval.tracking_uri",
                "eval.experiment", "eval.parent_run_id")


@dataclass
class Comparison:
    """The comparison table (rows of run name, differing params and metrics) and its files."""

    rows: list[dict[str, Any]]
    param_columns: list[str]
    metric_columns: list[str]
    markdown: str
    table_path: Path
    curves_path: Path | None
    runs: dict[str, RunRecord] = field(default_factory=dict)


def _rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per pretraining run (with its newest eval's metrics) or orphan eval run."""
    evals = [r for r in runs if r.tags.get("hjepa.stage") == "evaluate"]
    trains = {r.run_id: r for r in runs if r.tags.get("hjepa.stage") != "evaluate"}
    rows: dict[str, dict[str, Any]] = {
        r.run_id: {"run": r.run_name, "run_id": r.run_id, "kind": "pretrain", "status": r.status,
                   "params": dict(r.params), "metrics": dict(r.metrics), "eval_run_id": None}
        for r in trains.values()
    }
    for run in evals:  # newest first: the first eval seen for a parent wins
        parent = run.tags.get("hjepa.pretrain_run_id") or run.parent_run_id
        eval_params = {k: v for k, v in run.params.items() if k.startswith("eval.")}
        if parent in rows and rows[parent]["eval_run_id"] is None:
            rows[parent]["eval_run_id"] = run.run_id
            rows[parent]["params"].update(eval_params)
            rows[parent]["metrics"].update(run.metrics)
        elif parent not in rows:
            params = {k.removeprefix("pretrain."): v for k, v in run.params.items() if k.startswith("pretrain.")}
            rows[run.run_id] = {"run": run.run_name, "run_id": run.run_id, "kind": "eval", "status": run.status,
                                "params": {**params, **eval_params}, "metrics": dict(run.metrics),
                                "eval_run_id": run.run_id}
    return list(rows.values())


def _differing(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for row in rows for k in row["params"]})
    return [k for k in keys if not k.startswith(_BOOKKEEPING)
            and len({row["params"].get(k) for row in rows}) > 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _markdown(experiment: str, metric: str, rows: list[dict[str, Any]], params: list[str],
              metrics: list[str]) -> str:
    header = ["run", "run id", *params, *metrics]
    lines = [f"# MLflow experiment `{experiment}`: {len(rows)} runs, sorted by `{metric}`", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [row["run"], row["run_id"][:8], *(row["params"].get(k) for k in params),
                 *(row["metrics"].get(m) for m in metrics)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if not params:
        lines += ["", "(the runs share every config key)"]
    return "\n".join(lines) + "\n"


def _plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    from hjepa_core.plots import save_figure_png

    panels = [k for k in curves if any(curves[k].values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for run, points in curves[key].items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=run, linewidth=1.3, marker="o" if len(points) < 6 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure_png(fig, path)


def compare_runs(
    experiment: str,
    metric: str = "probe_top1",
    tracking_uri: str | None = None,
    output_dir: str | Path = "outputs/compare",
    curves: tuple[str, ...] = CURVES,
    max_runs: int = 100,
) -> Comparison:
    """Builds the comparison table of ``experiment``'s runs; writes ``compare.md`` and ``compare_curves.png``.

    Args:
        experiment: MLflow experiment name.
        metric: the sort key (descending; ``*loss*`` metrics ascending); runs without it go last.
        tracking_uri: None: ``MLFLOW_TRACKING_URI`` or MLflow's default.
        output_dir: where the table and the PNG go.
        curves: metric histories to plot, one panel each (panels with no data are left out).
        max_runs: most recent runs to read.
    Raises:
        ExperimentNotFoundError, TrackingUnavailableError: with what to fix.
    """
    runs = search_runs(experiment, tracking_uri, max_results=max_runs)
    rows = _rows(runs)
    ascending = "loss" in metric

    def sort_key(row: dict[str, Any]) -> tuple[bool, float]:
        value = row["metrics"].get(metric)
        return value is None, (value if ascending else -value) if value is not None else 0.0

    rows.sort(key=sort_key)
    params = _differing(rows)
    metrics = [metric, *(m for m in KEY_METRICS if m != metric and any(m in r["metrics"] for r in rows))]
    output_dir = Path(output_dir)
    markdown = _markdown(experiment, metric, rows, params, metrics)
    table_path = atomic_write_text(output_dir / "compare.md", markdown)
    histories = {key: {f"{row['run']} ({row['run_id'][:6]})": metric_history(row["run_id"], key, tracking_uri)
                       for row in rows if row["kind"] == "pretrain"}
                 for key in curves}
    curves_path = None
    if any(points for per_run in histories.values() for points in per_run.values()):
        curves_path = _plot_curves(histories, output_dir / "compare_curves.png", f"experiment {experiment}")
    return Comparison(rows, params, metrics, markdown, table_path, curves_path, {r.run_id: r for r in runs})
