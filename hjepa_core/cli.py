"""The ``hjepa`` command line: thin sub-commands over library functions."""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from hjepa_core.constants import DEFAULT_SAMPLES_PER_SHARD, FETCHABLE_DATASETS, SHARD_IMAGE_FORMATS


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain H-JEPA (multi-crop) from a YAML config")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply where it is silent")
    p.add_argument("--params", help="a DVC params file (params.yaml) whose config sections (data, masking, "
                   "model, ...) are layered over --config; its other sections are ignored")
    p.add_argument("--batch_size", type=int, help="= training.batch_size")
    p.add_argument("--epochs", type=int, help="= training.epochs on an epoch schedule (training.time_budget_s=null, "
                   "unless a key=value sets it)")
    p.add_argument("--lr", type=float, help="= training.lr")
    p.add_argument("--output_dir", help="= training.output_dir")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume from a checkpoint file/dir, or the newest in output_dir when given alone "
                   "(or followed by a key=value override)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config key, e.g. masking.strategy=cross_crop_prediction (anywhere on the line)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from hjepa_core.config import load_config
    from hjepa_core.constants import EPOCH_SCHEDULE
    from hjepa_core.eval.knn_monitor import epoch_monitor
    from hjepa_core.train import train

    overrides = [EPOCH_SCHEDULE] if args.epochs is not None else []
    overrides += args.overrides
    for flag, key in (("batch_size", "training.batch_size"), ("epochs", "training.epochs"),
                      ("lr", "training.lr"), ("output_dir", "training.output_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides, params=args.params)
    result = train(config, resume=args.resume, progress=not args.no_progress, monitor=epoch_monitor(config))
    if result.preempted:
        print(f"pre-empted at step {result.steps}; checkpoint in {result.output_dir / 'checkpoints'}")
        return 143
    if result.encoder_path is not None:
        print(f"trained {result.steps} steps; final loss {result.metrics.get('final_loss')}")
        print(f"encoder: {result.encoder_path}")
        if result.run_id:
            print(f"MLflow run: {result.run_id}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="linear probe + kNN of a frozen encoder, with random-init and pixel baselines")
    p.add_argument("--checkpoint", required=True, help="encoder.pt from `hjepa train` (or its output dir)")
    p.add_argument("--dataset", help="fashion_mnist, cifar10, imagefolder:PATH, shards:DIR, ... "
                   "(default: the checkpoint config's data.dataset)")
    p.add_argument("--data_path", help="where the dataset's files are")
    p.add_argument("--config", help="optional YAML; its model must match the checkpoint")
    p.add_argument("--pooling", default="mean", help="mean | max | mean_max | level:K | levels")
    p.add_argument("--max_train_samples", type=int, help="fixed subset of train (default: all)")
    p.add_argument("--max_test_samples", type=int, help="fixed subset of test (default: all)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for decoding")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--probe_epochs", type=int, default=30, help="linear-probe epochs")
    p.add_argument("--probe_lrs", type=_floats, default=None, help="comma-separated lr sweep")
    p.add_argument("--probe_wds", type=_floats, default=None, help="comma-separated weight-decay sweep")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw-pixel baselines")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--cache_dir", help="feature cache (default: $HJEPA_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="always re-extract features")
    p.add_argument("--output_dir", help="report folder (default: <checkpoint dir>/eval)")
    p.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=None,
                   help="log to MLflow (default: as the checkpoint config's tracking.enabled)")
    p.add_argument("--tracking_uri", help="MLflow URI (default: config / MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment (default: the pretraining run's)")
    p.add_argument("--parent_run_id", help="pretraining run to nest under (default: looked up by output dir)")
    p.add_argument("--registered_model_name", help="register the scored encoder under this MLflow name "
                   "(default: the checkpoint config's tracking.registered_model_name; '' registers nothing)")
    p.add_argument("--on_corrupt", choices=("skip", "fail"),
                   help="corrupt shards: skip them (counted, reported) or fail (default: the checkpoint config's)")
    p.add_argument("--max_corrupt_fraction", type=float,
                   help="skipping more than this fraction of a split fails (default: the checkpoint config's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from hjepa_core.config import load_config
    from hjepa_core.eval import EvalError, EvalSettings, ProbeSettings, evaluate

    probe = ProbeSettings(epochs=args.probe_epochs)
    probe.lrs = args.probe_lrs or probe.lrs
    probe.weight_decays = args.probe_wds or probe.weight_decays
    settings = EvalSettings(
        dataset=args.dataset, data_path=args.data_path, pooling=args.pooling,
        max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples,
        batch_size=args.batch_size, num_workers=args.num_workers, k=args.k, temperature=args.temperature,
        probe=probe, baselines=not args.no_baselines, device=args.device, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, output_dir=args.output_dir, progress=not args.no_progress,
        tracking=args.tracking, tracking_uri=args.tracking_uri, experiment=args.experiment,
        parent_run_id=args.parent_run_id, registered_model_name=args.registered_model_name,
        on_corrupt=args.on_corrupt, max_corrupt_fraction=args.max_corrupt_fraction,
    )
    try:
        config = load_config(args.config) if args.config else None
        report = evaluate(args.checkpoint, settings, config)
    except (EvalError, ValueError) as exc:
        print(f"hjepa evaluate: error: {exc}", file=sys.stderr)
        return 2
    with open(report["files"]["report"]) as f:
        print(f.read())
    print(f"wrote {report['files']['json']}, {report['files']['confusion_matrix']}")
    if report["mlflow_run_id"]:
        print(f"MLflow run: {report['mlflow_run_id']} (parent {report['mlflow_parent_run_id']})")
    registered = report.get("registered_model")
    if registered:
        print(f"registered {registered['uri']} (aliases: {', '.join(registered['aliases'])}; "
              f"{registered['champion_decision']})")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="table + curves of an MLflow experiment's runs")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--metric", default="probe_top1", help="sort key (default: probe_top1)")
    p.add_argument("--tracking_uri", help="MLflow URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--output_dir", default="outputs/compare", help="where compare.md and the PNG go")
    p.add_argument("--max_runs", type=int, default=100, help="most recent runs to read")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from hjepa_core.eval.compare import compare_runs
    from hjepa_core.tracking import ExperimentNotFoundError

    try:
        result = compare_runs(args.experiment, args.metric, args.tracking_uri, args.output_dir,
                              max_runs=args.max_runs)
    except ExperimentNotFoundError as exc:
        print(f"hjepa compare: error: {exc}", file=sys.stderr)
        return 2
    print(result.markdown)
    print(f"wrote {result.table_path}" + (f", {result.curves_path}" if result.curves_path else ""))
    return 0


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_byte_size(text: str) -> int:
    """Parses ``500000``, ``64MB``, ``1GiB`` ... into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500000, 64MB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_shard(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("shard", help="write a dataset as verified WebDataset shards with a manifest")
    parser.add_argument("--source", required=True,
                        help="fashion_mnist | imagefolder:PATH | cifar10:PATH | cifar100:PATH | stl10:PATH")
    parser.add_argument("--out", required=True, help="shard directory (manifest.json goes there)")
    parser.add_argument("--split", default="train", help="split to write (default: train)")
    parser.add_argument("--data-path", default=None, help="dataset folder when not in --source")
    parser.add_argument("--max-samples", type=_positive_int, default=None,
                        help="write a fixed random subset of this size (quick runs)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--samples-per-shard", type=_positive_int, default=None,
                       help=f"samples per shard (default {DEFAULT_SAMPLES_PER_SHARD}, capped at 1 GiB)")
    limit.add_argument("--max-shard-bytes", type=parse_byte_size, default=None,
                       help="bytes per shard file at most, e.g. 256MB")
    parser.add_argument("--image-format", choices=sorted(SHARD_IMAGE_FORMATS), default="png",
                        help="png (lossless, default) or jpeg; matching files are stored as-is")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument("--workers", type=int, default=1,
                        help="encoding processes (0: all CPUs); output is identical for any value")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the source order (default: a seeded random order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_shard)


def _run_shard(args: argparse.Namespace) -> int:
    """``hjepa shard``; returns the exit code (0 ok, 1 nothing written, 2 bad input)."""
    from hjepa_core.data.shards import MANIFEST_NAME, write_shards
    from hjepa_core.data.sources import DatasetNotFoundError

    try:
        manifest = write_shards(
            args.source, args.out, args.split, data_path=args.data_path,
            max_samples=args.max_samples,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
            image_format=args.image_format, quality=args.quality, workers=args.workers,
            shuffle=not args.no_shuffle, seed=args.seed, progress=not args.no_progress,
        )
    except (DatasetNotFoundError, ValueError, OSError) as exc:
        print(f"hjepa shard: error: {exc}", file=sys.stderr)
        return 2
    info = manifest["splits"][args.split]
    reasons = ", ".join(f"{k}: {v}" for k, v in info["skipped_by_reason"].items())
    print(
        f"{args.split}: {info['num_inputs']} inputs = {info['num_samples']} written in "
        f"{len(info['shards'])} shard(s) + {info['num_skipped']} skipped"
        + (f" ({reasons})" if reasons else "")
        + f"; {info['num_converted']} converted; manifest: {Path(args.out) / MANIFEST_NAME}"
    )
    if info["num_samples"] == 0:
        print("hjepa shard: error: no readable images", file=sys.stderr)
        return 1
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="raw dataset files: `hjepa data fetch NAME DEST`")
    data_sub = parser.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="copy (or download) a dataset's raw files into a folder, hash-checked")
    fetch.add_argument("name", choices=FETCHABLE_DATASETS, help="dataset name")
    fetch.add_argument("dest", help="destination folder, e.g. data/")
    fetch.add_argument("--no-download", action="store_true", help="fail rather than download when not installed")
    fetch.set_defaults(func=_run_data_fetch)


def _run_data_fetch(args: argparse.Namespace) -> int:
    """``hjepa data fetch``; returns the exit code."""
    from hjepa_core.data.fetch import FetchError, fetch_dataset

    try:
        paths = fetch_dataset(args.name, args.dest, download=not args.no_download)
    except (FetchError, ValueError) as exc:
        print(f"hjepa data fetch: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path}  sha256 ok")
    return 0


PLUGIN_GROUP = "hjepa.commands"


def _add_plugins(sub: argparse._SubParsersAction) -> None:
    """Sub-commands other installed packages register under the ``hjepa.commands`` entry-point
    group: each entry point is a function that adds its parser(s) to ``sub`` (``hjepa pipeline``
    comes from ``hjepa_kfp`` this way, so this library never imports the KFP front door)."""
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except Exception as exc:  # a broken plugin must not take the other commands down
            print(f"hjepa: warning: cannot load the {entry.name!r} command ({entry.value}): "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        register(sub)


class _BooleanFlag(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no_flag``: argparse reads "no" only from the hyphen spelling ``--no-flag``,
    so :func:`_one_flag_style` turns every ``BooleanOptionalAction`` into this one, or the
    underscore spelling it adds would mean True."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[object] | None, option_string: str | None = None) -> None:
        hyphenated = None if option_string is None else "--" + option_string[2:].replace("_", "-")
        super().__call__(parser, namespace, values, hyphenated)


def _spellings(option: str) -> list[str]:
    """``--data_path`` and ``--data-path`` for either; other options as they are."""
    if not option.startswith("--") or not any(c in option[2:] for c in "-_"):
        return [option]
    return ["--" + option[2:].replace("-", "_"), "--" + option[2:].replace("_", "-")]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's underscore spelling only (the hyphen alias works, but would double the help)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1:
            action = copy.copy(action)
            action.option_strings = list(dict.fromkeys(_spellings(s)[0] for s in action.option_strings))
        return super()._format_action_invocation(action)


def _one_flag_style(parser: argparse.ArgumentParser) -> None:
    """Every multi-word flag of ``parser`` and its sub-commands (plugins included) answers to the
    spec's underscore spelling (``--data_path``, shown in help and usage) and to the hyphen one."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(p): p for p in action.choices.values()}.values():
                _one_flag_style(child)
            continue
        if type(action) is argparse.BooleanOptionalAction:
            action.__class__ = _BooleanFlag
        spelled = list(dict.fromkeys(form for option in action.option_strings for form in _spellings(option)))
        for option in spelled:
            parser._option_string_actions[option] = action
        action.option_strings = spelled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hjepa", description=__doc__,
        epilog="Flags use underscores (--data_path); the hyphen spelling (--data-path) works too.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_shard(sub)
    _add_evaluate(sub)
    _add_compare(sub)
    _add_data(sub)
    _add_plugins(sub)
    _one_flag_style(parser)
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses a command line. ``key=value`` overrides may stand anywhere, after flags too, and
    ``--resume`` never takes one as its path: ``--resume training.lr=1e-4`` resumes from the
    newest checkpoint (``auto``) with that override."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    stray = [t for t in extras if not (hasattr(args, "overrides") and _OVERRIDE.match(t))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if not hasattr(args, "overrides"):
        return args
    found = Counter([*args.overrides, *extras])
    if isinstance(getattr(args, "resume", None), str) and _OVERRIDE.match(args.resume):
        found[args.resume] += 1
        args.resume = "auto"
    args.overrides = []
    for token in argv:  # command-line order: a later override of one key wins
        if found[token] > 0:
            found[token] -= 1
            args.overrides.append(token)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hjepa`` console script.

    Building the parser imports neither torch nor mlflow: each sub-command imports its library
    code when it runs, so ``hjepa --help`` answers at once.
    """
    args = parse_args(argv)
    warnings.formatwarning = _one_line_warning(args.command)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"hjepa {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _one_line_warning(command: str) -> Callable[..., str]:
    """Warnings print as one line, as errors do (``hjepa train: warning: ...``): their messages
    name the file and what was skipped, and Python's default adds the warning's source line."""

    def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        return f"hjepa {command}: warning: {message}\n"

    return format_warning


def _user_errors() -> tuple[type[Exception], ...]:
    """The library's errors that mean bad input: one line on stderr and exit code 2, no traceback
    (their messages name the file, key or path and the fix); anything else is a bug and keeps
    its traceback."""
    from hjepa_core.config import ConfigError
    from hjepa_core.data.images import BadImageError
    from hjepa_core.data.shards import ShardIntegrityError
    from hjepa_core.data.sources import DatasetNotFoundError
    from hjepa_core.eval import EvalError
    from hjepa_core.masks import MaskConfigError
    from hjepa_core.tracking import TrackingUnavailableError
    from hjepa_core.train.checkpoint import CheckpointError
    from hjepa_core.utils import DiskFullError, RunLockedError

    return (ConfigError, MaskConfigError, DatasetNotFoundError, TrackingUnavailableError, BadImageError,
            CheckpointError, EvalError, DiskFullError, RunLockedError, ShardIntegrityError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
