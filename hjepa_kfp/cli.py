"""``hjepa pipeline compile|run-local``: the Kubeflow front door's sub-commands.

Registered with the ``hjepa`` command line through the ``hjepa.commands`` entry point (see
pyproject.toml), so :mod:`hjepa_core` never imports this package. Importing this module imports
neither kfp nor torch; each sub-command imports :mod:`hjepa_kfp.pipeline` when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``hjepa pipeline compile|run-local`` to the ``hjepa`` command line (the
    ``hjepa.commands`` entry point)."""
    parser = commands.add_parser("pipeline", help="Kubeflow pipeline: `compile` to YAML, or `run-local`")
    sub = parser.add_subparsers(dest="pipeline_command", required=True)
    comp = sub.add_parser("compile", help="compile the KFP pipeline to YAML")
    comp.add_argument("--output", help="YAML path (default: pipelines/hjepa_pipeline.yaml in the source checkout)")
    comp.add_argument("--image", help="container image of every component (default: the released one)")
    comp.add_argument("--cache-training", action="store_true",
                      help="let KFP reuse pretrain/evaluate results for identical inputs (shard always may)")
    comp.set_defaults(func=run_compile)
    loc = sub.add_parser("run-local", help="run the pipeline here with KFP's SubprocessRunner (CPU)")
    loc.add_argument("--root", default="outputs/pipeline", help="local pipeline root (artifacts)")
    loc.add_argument("--source", default="fashion_mnist", help="dataset spec, as for `hjepa shard`")
    loc.add_argument("--data-path", default="", help="dataset folder when not in --source")
    loc.add_argument("--config", default="configs/fashion_mnist.yaml", help="YAML config")
    loc.add_argument("--max-samples", type=int, default=4096, help="training images to shard (0: all)")
    loc.add_argument("--max-test-samples", type=int, default=2000, help="test images to shard (0: all)")
    loc.add_argument("--epochs", type=int, default=0, help="= training.epochs (0: the config's)")
    loc.add_argument("--strategy", default="", help="= masking.strategy (empty: the config's)")
    loc.add_argument("--checkpoint-root", default="", help="checkpoint folder (default: a temporary one)")
    loc.add_argument("--shard-root", default="",
                     help="shards go to SHARD_ROOT/<run id>, a folder or s3://... (default: the shard artifact)")
    loc.add_argument("--mlflow-uri", default="", help="MLflow URI (default: MLFLOW_TRACKING_URI; none: off)")
    loc.add_argument("--experiment", default="hjepa-pipeline", help="MLflow experiment")
    loc.add_argument("--eval-max-train-samples", type=int, default=0, help="probe training images (0: all)")
    loc.add_argument("--eval-max-test-samples", type=int, default=0, help="probe test images (0: all)")
    loc.add_argument("--probe-epochs", type=int, default=30, help="linear-probe epochs")
    loc.add_argument("--no-baselines", action="store_true", help="skip the random-init and pixel baselines")
    loc.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    loc.set_defaults(func=run_local_command)


def _pipeline_module() -> Any:
    """:mod:`hjepa_kfp.pipeline` (imports kfp, so only when a sub-command runs)."""
    try:
        from hjepa_kfp import pipeline
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"cannot import the pipeline ({exc}); install the pipeline extra "
                                "(pip install -e '.[pipeline]')") from exc
    return pipeline


def run_compile(args: argparse.Namespace) -> int:
    """``hjepa pipeline compile``."""
    module = _pipeline_module()
    path = module.compile_pipeline(args.output or module.COMPILED, args.image or module.DEFAULT_IMAGE,
                                   cache_training=args.cache_training)
    print(f"wrote {path}")
    return 0


def _score_table(evaluation: dict[str, Any]) -> str:
    """Probe and kNN top-1 of the trained encoder beside the baselines, as a small text table."""
    methods = evaluation.get("methods", {})
    names = {"encoder": f"trained encoder ({evaluation.get('selected_encoder', 'target')})",
             "random_init": "random init (same ViT)", "pixels": "raw pixels"}
    lines = [f"{'':28s} {'probe top-1':>12s} {'kNN top-1':>10s}"]
    for key, label in names.items():
        if key in methods:
            probe, knn = methods[key]["probe"]["top1"], methods[key]["knn"]["top1"]
            lines.append(f"{label:28s} {100 * probe:11.2f}% {100 * knn:9.2f}%")
    return "\n".join(lines)


def _folder_or_url(location: str) -> str:
    """``location`` made absolute when it is a local folder (run-local changes the working directory)."""
    from hjepa_core.data.shards.spec import local_path

    local = local_path(location) if location else None
    return str(local.resolve()) if local is not None else location


def run_local_command(args: argparse.Namespace) -> int:
    """``hjepa pipeline run-local``: prints the probe accuracy and where the outputs are."""
    from hjepa_core.tracking import resolve_tracking_uri
    from hjepa_core.utils import redact_url

    module = _pipeline_module()
    uri = resolve_tracking_uri(args.mlflow_uri) or ""
    arguments = {
        "source": args.source, "data_path": args.data_path, "max_samples": args.max_samples,
        "max_test_samples": args.max_test_samples, "config": str(Path(args.config).resolve()) if args.config else "",
        "config_overrides": list(args.overrides), "epochs": args.epochs, "strategy": args.strategy, "gpus": 0,
        "checkpoint_root": str(Path(args.checkpoint_root).resolve()) if args.checkpoint_root else "",
        "shard_root": _folder_or_url(args.shard_root),
        "mlflow_uri": uri, "experiment": args.experiment, "eval_max_train_samples": args.eval_max_train_samples,
        "eval_max_test_samples": args.eval_max_test_samples, "probe_epochs": args.probe_epochs,
        "baselines": not args.no_baselines,
    }
    try:
        run = module.run_local(args.root, arguments)
    except RuntimeError as exc:
        print(f"hjepa pipeline run-local: error: {exc}", file=sys.stderr)
        return 1
    print(f"linear-probe top-1 accuracy: {100 * run.probe_top1:.2f}%")
    print(_score_table(run.evaluation))
    print(f"outputs: {run.run_dir}")
    for name, path in sorted(run.artifacts.items()):
        print(f"  {name}: {path}")
    if uri:
        shown = redact_url(uri)
        where = (f"open {shown}" if uri.startswith("http")
                 else f"mlflow ui --backend-store-uri {shown}  (or make mlflow-ui)")
        print(f"MLflow (experiment {args.experiment!r}): {where}")
    return 0
