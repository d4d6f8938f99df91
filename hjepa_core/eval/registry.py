"""Registering an evaluated encoder, so the MLflow model registry only holds scored versions.

After :func:`hjepa_core.eval.evaluate` has scored a checkpoint, :func:`register_evaluated` logs
the encoder that scored (the target or the context encoder, see ``selected_encoder``) as a pyfunc
model of the evaluation run: weights plus architecture (:mod:`hjepa_core.serving`, no
pickled classes), a signature, and an input example of real test images. The new version carries
the scores and baselines as tags and the alias ``candidate`` (the newest evaluated version).
``champion`` moves to it only when its probe top-1 beats both the current champion's and the
raw-pixel baseline's; a version evaluated without baselines never becomes champion.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from hjepa_core.eval.features import LoadedEncoder, pixel_batches
from hjepa_core.serving import load_serving_encoder, save_serving_encoder
from hjepa_core.tracking import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    alias_version,
    log_registered_encoder,
    set_alias,
    set_version_tags,
)

SCORE = "probe_top1"
BASELINE = "pixels_probe_top1"
SCORE_TAGS = ("probe_top1", "probe_top5", "knn_top1", "knn_top5", "target_probe_top1", "context_probe_top1",
              "random_init_probe_top1", "random_init_knn_top1", "pixels_probe_top1", "pixels_knn_top1")
EXAMPLE_IMAGES = 2


def champion_decision(scores: dict[str, float], champion: dict[str, str] | None) -> tuple[bool, str]:
    """Whether a version scoring ``scores`` takes ``champion`` (its tags, None: no champion yet), and why.

    It must beat the raw-pixel baseline's probe top-1 and the champion's, both strictly.
    """
    own, pixels = scores[SCORE], scores.get(BASELINE)
    if pixels is None:
        return False, "no raw-pixel baseline was scored (evaluate with baselines to compete for champion)"
    if own <= pixels:
        return False, f"{SCORE} {own:.4f} does not beat raw pixels ({pixels:.4f})"
    if champion is None:
        return True, f"{SCORE} {own:.4f} beats raw pixels ({pixels:.4f}); there was no champion"
    theirs = float(champion.get(SCORE, "nan"))
    if math.isnan(theirs):
        return False, f"champion version {champion['version']} has no {SCORE} tag to compare with"
    if own <= theirs:
        return False, f"{SCORE} {own:.4f} does not beat champion version {champion['version']} ({theirs:.4f})"
    return True, (f"{SCORE} {own:.4f} beats raw pixels ({pixels:.4f}) and champion version "
                  f"{champion['version']} ({theirs:.4f})")


def version_tags(report: dict[str, Any], loaded: LoadedEncoder, eval_run_id: str) -> dict[str, str]:
    """The scores, baselines and provenance a registered version carries."""
    metrics = report["metrics"]
    tags = {key: f"{metrics[key]:.6f}" for key in SCORE_TAGS if key in metrics}
    tags.update({"selected_encoder": report["selected_encoder"], "eval_dataset": report["dataset"],
                 "num_train": str(report["num_train"]), "num_test": str(report["num_test"]),
                 "crop_size": str(report["crop_size"]), "eval_run_id": eval_run_id,
                 "checkpoint_sha256": report["checkpoint_sha256"]})
    if loaded.mlflow_run_id:
        tags["pretrain_run_id"] = loaded.mlflow_run_id
    return tags


def register_evaluated(
    report: dict[str, Any], loaded: LoadedEncoder, test_source: Any, name: str, eval_run_id: str,
    tracking_uri: str | None,
) -> dict[str, Any]:
    """Registers the scored encoder as a new version of ``name``; sets ``candidate`` and maybe ``champion``.

    Returns:
        ``name``, ``version``, ``aliases`` (of the new version), ``champion_decision`` (why or why
        not champion) and ``uri`` (``models:/NAME/VERSION``).
    """
    encoder = loaded.context_encoder if report["selected_encoder"] == "context" else loaded.encoder
    assert encoder is not None  # the report selects the context encoder only when the checkpoint has one
    pixels, _ = next(iter(pixel_batches(test_source, loaded.crop_size, batch_size=EXAMPLE_IMAGES)))
    example = pixels.numpy()
    with tempfile.TemporaryDirectory(prefix="hjepa-register-") as scratch:
        weights = save_serving_encoder(encoder, loaded.crop_size, Path(scratch) / "encoder.pt")
        output = load_serving_encoder(weights).predict(example)  # the file round-trips before it is logged
        version = log_registered_encoder(eval_run_id, tracking_uri, name, weights, example, output,
                                         version_tags(report, loaded, eval_run_id))
    set_alias(name, CANDIDATE_ALIAS, version, tracking_uri)
    promote, reason = champion_decision(report["metrics"], alias_version(name, CHAMPION_ALIAS, tracking_uri))
    if promote:
        set_alias(name, CHAMPION_ALIAS, version, tracking_uri)
    set_version_tags(name, version, {"champion_decision": reason}, tracking_uri)
    aliases = [CANDIDATE_ALIAS, CHAMPION_ALIAS] if promote else [CANDIDATE_ALIAS]
    return {"name": name, "version": version, "aliases": aliases, "champion_decision": reason,
            "uri": f"models:/{name}/{version}"}
