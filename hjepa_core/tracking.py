"""MLflow tracking behind a small interface (the only module that imports mlflow).

The URI comes from ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI`` (else MLflow's own
default). :func:`check_tracking_uri` fails fast, before any training, when a server is not
reachable; after start-up, :class:`BestEffortTracker` keeps a server that dies or hangs from
ever blocking training. :class:`NullTracker` stands in when tracking is off and on non-zero ranks.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hjepa_core.utils import REDACTED, redact_url


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached; the message says what to do."""


class NullTracker:
    """Does nothing; used when tracking is disabled and on non-zero ranks."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs run parameters."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Logs metric values at ``step``."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file as a run artifact."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags."""

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run."""


def resolve_tracking_uri(uri: str | None) -> str | None:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else None (MLflow's own default; for the pipeline
    stages: no tracking). A URI whose credentials were redacted when it was saved (a stored
    config's) gives way to ``MLFLOW_TRACKING_URI``.

    Raises:
        TrackingUnavailableError: a redacted URI and no ``MLFLOW_TRACKING_URI``.
    """
    if uri and REDACTED in uri:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        raise TrackingUnavailableError(
            f"tracking URI {uri} was saved without its credentials; pass the full URI "
            "(--tracking_uri / tracking.tracking_uri) or set MLFLOW_TRACKING_URI")
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _health_url(uri: str) -> str:
    """``URI/health`` without user-info or query (urllib cannot open user-info; /health needs no login)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, f"{parts.path.rstrip('/')}/health", "", ""))


def check_tracking_uri(uri: str | None, timeout: float = 5.0) -> None:
    """Raises :class:`TrackingUnavailableError` when an http(s) server does not answer (the
    message never shows the URI's credentials)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    shown = redact_url(uri)
    try:
        with urllib.request.urlopen(_health_url(uri), timeout=timeout) as response:
            if response.status >= 400:
                raise TrackingUnavailableError(f"MLflow server {shown} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable ({exc}). Start it "
            "(`mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI / "
            "tracking.tracking_uri, or run with tracking.enabled=false."
        ) from exc


def git_commit(cwd: str | Path = ".") -> str | None:
    """The current git commit of ``cwd``, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_tags() -> dict[str, str]:
    """``dvc_experiment`` from ``DVC_EXP_NAME`` (set by ``dvc exp run``), when present."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"dvc_experiment": name} if name else {}


class MlflowTracker(NullTracker):
    """Logs one MLflow run (optionally nested under ``parent_run_id``)."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self._mlflow = mlflow = _use_tracking_uri(tracking_uri)
        self._client = mlflow.MlflowClient()
        mlflow_experiment = mlflow.set_experiment(experiment)
        self.experiment_id = mlflow_experiment.experiment_id
        all_tags = dict(tags or {})
        commit = git_commit()
        if commit:
            all_tags.setdefault("git_commit", commit)
        for key, value in dvc_tags().items():
            all_tags.setdefault(key, value)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    @classmethod
    def for_run(cls, run_id: str, tracking_uri: str | None = None) -> MlflowTracker:
        """A tracker of an existing run (to tag it, log to it or end it), creating nothing."""
        tracker = cls.__new__(cls)
        tracker._mlflow = mlflow = _use_tracking_uri(tracking_uri)
        tracker._client = mlflow.MlflowClient()
        tracker.run_id = run_id
        tracker.experiment_id = tracker._client.get_run(run_id).info.experiment_id
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[start:start + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


class BestEffortTracker(NullTracker):
    """Forwards to a started tracker without ever blocking or failing the caller (training, evaluation).

    Each call runs in a daemon thread and is given up after ``timeout`` seconds (uploads:
    ``10 x timeout``); an error or a timeout is one warning, and the calls after it are skipped,
    and counted in ``skipped``, until the server answers ``/health`` again (asked at most every
    ``retry_every`` seconds, with a 2 s timeout). A call given up may still complete in its thread.
    """

    def __init__(self, tracker: NullTracker, uri: str | None, timeout: float = 30.0,
                 retry_every: float = 30.0) -> None:
        self.tracker, self.uri, self.timeout, self.retry_every = tracker, uri, timeout, retry_every
        self.run_id, self.experiment_id = tracker.run_id, tracker.experiment_id
        self.skipped = 0
        self._retry_at: float | None = None  # set while the server is considered down

    def _available(self) -> bool:
        import time

        if self._retry_at is None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            check_tracking_uri(resolve_tracking_uri(self.uri), timeout=2.0)
        except TrackingUnavailableError:
            self._retry_at = time.monotonic() + self.retry_every
            return False
        self._retry_at = None
        return True

    def _call(self, name: str, *args: Any, upload: bool = False) -> None:
        import threading
        import time
        import warnings

        if not self._available():
            self.skipped += 1
            return
        errors: list[BaseException] = []

        def call() -> None:
            try:
                getattr(self.tracker, name)(*args)
            except BaseException as exc:  # reported below, never raised into training
                errors.append(exc)

        thread = threading.Thread(target=call, name=f"mlflow-{name}", daemon=True)
        thread.start()
        limit = self.timeout * (10 if upload else 1)
        thread.join(limit)
        if not (thread.is_alive() or errors):
            return
        self.skipped += 1
        self._retry_at = time.monotonic() + self.retry_every
        reason = f"no answer in {limit:g} s" if thread.is_alive() else f"{type(errors[0]).__name__}: {errors[0]}"
        reason = " ".join(reason.split())[:300]
        where = redact_url(resolve_tracking_uri(self.uri) or "MLflow")
        warnings.warn(f"MLflow {name} failed ({reason}); the run goes on and skips MLflow calls until {where} "
                      f"answers again (asked every {self.retry_every:g} s); its files are written locally",
                      stacklevel=3)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path, upload=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", status)


def start_tracker(tracking_cfg: Any, enabled: bool = True) -> NullTracker:
    """A :class:`BestEffortTracker` over a new :class:`MlflowTracker` run when tracking is on for
    this process, else a :class:`NullTracker`. Starting raises (:class:`TrackingUnavailableError`
    for a server that does not answer); everything after start-up is best-effort."""
    if not (enabled and tracking_cfg.enabled):
        return NullTracker()
    tracker = MlflowTracker(
        experiment=tracking_cfg.experiment,
        run_name=tracking_cfg.run_name,
        tracking_uri=tracking_cfg.tracking_uri,
        parent_run_id=tracking_cfg.parent_run_id,
        tags=tracking_cfg.tags,
    )
    return BestEffortTracker(tracker, tracking_cfg.tracking_uri, timeout=tracking_cfg.timeout_s)


class ExperimentNotFoundError(LookupError):
    """The named MLflow experiment does not exist at the tracking URI."""


@dataclass
class RunRecord:
    """One MLflow run as plain values (what :func:`search_runs` returns)."""

    run_id: str
    run_name: str
    status: str
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


def _use_tracking_uri(tracking_uri: str | None) -> Any:
    """The ``mlflow`` module, pointed at the resolved URI after checking that it answers."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    if uri:
        if redact_url(uri) != uri:  # MLflow would print "View run at <URI with its password>"
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        mlflow.set_tracking_uri(uri)
    return mlflow


def search_runs(
    experiment: str, tracking_uri: str | None = None, filter_string: str = "", max_results: int = 1000
) -> list[RunRecord]:
    """The runs of ``experiment`` (newest first) through ``mlflow.search_runs``.

    Raises:
        TrackingUnavailableError: the server does not answer.
        ExperimentNotFoundError: no experiment of that name.
    """
    mlflow = _use_tracking_uri(tracking_uri)
    if mlflow.MlflowClient().get_experiment_by_name(experiment) is None:
        raise ExperimentNotFoundError(
            f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}; "
            "check the name (`mlflow experiments search`) and MLFLOW_TRACKING_URI / --tracking_uri"
        )
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string=filter_string, max_results=max_results,
        order_by=["attributes.start_time DESC"], output_format="list",
    )
    return [
        RunRecord(
            run_id=run.info.run_id,
            run_name=run.info.run_name or run.info.run_id[:8],
            status=run.info.status,
            start_time=int(run.info.start_time or 0),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        )
        for run in runs
    ]


def metric_history(run_id: str, key: str, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """``(step, value)`` points of one metric of one run, in step order."""
    mlflow = _use_tracking_uri(tracking_uri)
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in history)


# -- model registry -------------------------------------------------------------------------------
# A registered version is an MLflow pyfunc model: a weights file loaded by SERVING_LOADER (no
# pickled classes), hjepa_core shipped as code_paths, a signature and an input example.
SERVING_LOADER = "hjepa_core.serving"
SERVING_DIR = "encoder"
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"


def model_requirements() -> list[str]:
    """The pip requirements of a registered encoder: hjepa's own dependencies, pinned to the
    installed versions (local build tags such as ``+cu128`` dropped)."""
    import importlib.metadata as metadata
    import re

    try:
        declared = metadata.requires("hjepa") or []
    except metadata.PackageNotFoundError:
        declared = ["torch", "numpy"]
    pinned = []
    for requirement in declared:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(requirement)
    return pinned


def log_registered_encoder(
    run_id: str, tracking_uri: str | None, name: str, weights: str | Path, input_example: Any,
    output_example: Any, tags: dict[str, str],
) -> str:
    """Logs ``weights`` (a :mod:`hjepa_core.serving` file) as a pyfunc model of run ``run_id``,
    registers it as ``name`` with a signature and an input example, tags the new version and returns
    its number."""
    import shutil
    import tempfile

    mlflow = _use_tracking_uri(tracking_uri)
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example)
    with tempfile.TemporaryDirectory(prefix="hjepa-model-") as scratch:
        code = Path(scratch) / "hjepa_core"
        shutil.copytree(Path(__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name=SERVING_DIR, loader_module=SERVING_LOADER, data_path=str(weights), code_paths=[str(code)],
                signature=signature, input_example=input_example, pip_requirements=model_requirements(),
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    set_version_tags(name, version, tags, tracking_uri)
    return version


def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> dict[str, str] | None:
    """The tags (plus ``version``) of the version of ``name`` that holds ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    client = _use_tracking_uri(tracking_uri).MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such model or alias; anything else (server errors) propagates
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
            return None
        raise
    return {**version.tags, "version": str(version.version)}


def set_alias(name: str, alias: str, version: str, tracking_uri: str | None = None) -> None:
    """Points ``alias`` of registered model ``name`` at ``version``."""
    _use_tracking_uri(tracking_uri).MlflowClient().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: dict[str, str], tracking_uri: str | None = None) -> None:
    """Sets tags on one model version."""
    client = _use_tracking_uri(tracking_uri).MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
