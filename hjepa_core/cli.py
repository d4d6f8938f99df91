"""The ``hjepa`` command line: thin sub-commands over library functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain H-JEPA (multi-crop) from a YAML config")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply where it is silent")
    p.add_argument("--batch_size", type=int, help="= training.batch_size")
    p.add_argument("--epochs", type=int, help="= training.epochs")
    p.add_argument("--lr", type=float, help="= training.lr")
    p.add_argument("--output_dir", help="= training.output_dir")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume from a checkpoint file/dir, or the newest in output_dir when given alone")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config key, e.g. masking.strategy=cross_crop_prediction")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from hjepa_core.config import load_config
    from hjepa_core.train import train

    overrides = list(args.overrides)
    for flag, key in (("batch_size", "training.batch_size"), ("epochs", "training.epochs"),
                      ("lr", "training.lr"), ("output_dir", "training.output_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.preempted:
        print(f"pre-empted at step {result.steps}; checkpoint in {result.output_dir / 'checkpoints'}")
        return 143
    if result.encoder_path is not None:
        print(f"trained {result.steps} steps; final loss {result.metrics.get('final_loss')}")
        print(f"encoder: {result.encoder_path}")
        if result.run_id:
            print(f"MLflow run: {result.run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hjepa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hjepa`` console script."""
    from hjepa_core.config import ConfigError
    from hjepa_core.data.images import BadImageError
    from hjepa_core.data.sources import DatasetNotFoundError
    from hjepa_core.tracking import TrackingUnavailableError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetNotFoundError, TrackingUnavailableError, BadImageError, FileNotFoundError) as exc:
        print(f"hjepa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
