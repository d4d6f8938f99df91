"""Typed configuration: defaults, YAML files and command-line overrides (DINOv2-style).

``load_config(path, overrides)`` builds an OmegaConf structured config from the dataclasses,
merges a YAML file (and the config sections of a DVC params file, for the DVC pipeline), then
``key=value`` dotlist overrides (``training.lr=1e-4``; the spec's ``--batch_size/--epochs/--lr``
map to ``training.*``), and converts the result back to the dataclasses, so callers read
``config.training.lr``. OmegaConf checks and converts each value to its field's type; unknown keys
are errors that suggest the nearest valid key; cross-field rules are checked in
:meth:`Config.validate`. Values follow OmegaConf's syntax: ``${...}`` interpolates
(``training.output_dir=${oc.env:HOME}/runs``).
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from hjepa_core.constants import (
    GLOBAL_CROP_SCALE,
    GLOBAL_CROP_SIZE,
    LOCAL_CROP_SCALE,
    LOCAL_CROP_SIZE,
    NUM_GLOBAL_CROPS,
    NUM_LOCAL_CROPS,
)


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and how to fix it."""


# OmegaConf 2.3 reads these annotations as written (`X | None` optional, list/dict typed containers);
# tuple[float, float] becomes a float list that _to_config length-checks and turns back into a tuple.
@dataclass
class MultiCropConfig:
    """Multi-crop transform parameters (the spec's table)."""

    num_global_crops: int = NUM_GLOBAL_CROPS
    num_local_crops: int = NUM_LOCAL_CROPS
    global_crop_size: int = GLOBAL_CROP_SIZE
    local_crop_size: int = LOCAL_CROP_SIZE
    global_crop_scale: tuple[float, float] = GLOBAL_CROP_SCALE
    local_crop_scale: tuple[float, float] = LOCAL_CROP_SCALE
    global_color_jitter: float = 0.4
    local_color_jitter: float = 0.4
    adaptive: bool = False
    min_local_crops: int = 2
    max_local_crops: int = 10
    warmup_epochs: int = 0


@dataclass
class DataConfig:
    """Where images come from and how they are loaded."""

    dataset: str = "fashion_mnist"
    data_path: str | None = None
    max_samples: int | None = None
    use_multicrop: bool = True
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    num_workers: int | None = None  # null: none on CPU, a share of the cores per GPU (auto_num_workers)
    pin_memory: bool = True
    knn_monitor_every: int = 0
    on_corrupt: str = "skip"  # corrupt shards/samples: skip them (counted, reported) or fail the run
    max_corrupt_fraction: float = 0.01  # skipping more than this fraction of the samples fails the run


@dataclass
class MaskingConfig:
    """Masking strategy and the global crops' hierarchical block masks."""

    strategy: str = "global_only"
    num_hierarchies: int = 3
    num_target_masks: int = 4
    base_scale: tuple[float, float] = (0.05, 0.15)
    aspect_ratio_range: tuple[float, float] = (0.75, 1.5)
    level_scale_growth: float = 1.0
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_context_patches: int = 4
    local_mask_ratio: float = 0.0
    cross_crop_target_fraction: float = 0.5


@dataclass
class ModelConfig:
    """Encoder (ViT preset or custom size) and predictor."""

    encoder: str = "vit_base"
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    predictor_embed_dim: int = 384
    predictor_depth: int = 6
    predictor_num_heads: int = 6
    use_rope: bool = False
    grad_checkpointing: bool = False


@dataclass
class LossConfig:
    """Prediction loss, level weights and the optional anti-collapse regulariser."""

    type: str = "smooth_l1"
    hierarchy_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    local_weight: float = 1.0
    local_level_weight: float = 0.0
    image_weight: float = 1.0
    vicreg_weight: float = 0.0
    sigreg_weight: float = 0.0
    collapse_every: int = 50


@dataclass
class TrainingConfig:
    """Optimisation, schedules, precision, checkpoints."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    ema_momentum: float = 0.996
    ema_momentum_end: float = 1.0
    grad_clip: float = 3.0  # max gradient norm; 0 turns clipping off
    accumulation_steps: int = 1
    precision: str = "auto"
    target_precision: str = "auto"  # the EMA target encoder's pass: auto (bf16 if native), fp32, bf16
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend: inductor, aot_eager, cudagraphs ...
    seed: int = 0
    max_steps: int | None = None
    time_budget_s: float | None = None
    log_every: int = 10
    checkpoint_every_steps: int = 0
    keep_last_checkpoints: int = 3
    output_dir: str = "outputs/train"
    device: str = "auto"


@dataclass
class TrackingConfig:
    """MLflow tracking (URI from ``MLFLOW_TRACKING_URI`` unless ``tracking_uri`` is set).

    ``registered_model_name``: the name ``hjepa evaluate`` registers the encoder under (None: none).
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "hjepa"
    run_name: str | None = None
    registered_model_name: str | None = "hjepa-encoder"
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0  # an MLflow call after start-up is given up (and warned) after this long


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as written out (config.yaml, checkpoints, MLflow params): the tracking URI
        without its credentials (:func:`~hjepa_core.utils.redact_url`)."""
        from hjepa_core.utils import redact_url

        values = _to_plain(dataclasses.asdict(self))
        uri = values["tracking"]["tracking_uri"]
        values["tracking"]["tracking_uri"] = redact_url(uri) if uri else uri
        return values

    def flat(self) -> dict[str, Any]:
        """``{"training.lr": 1e-4, ...}``: the form logged as MLflow params."""
        return flatten(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Writes the resolved config as YAML, atomically, in OmegaConf's dialect: it quotes
        strings that YAML would read as numbers (``'1e-4'``), so the file loads back identically."""
        from hjepa_core.utils import atomic_write_text

        return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(self.to_dict())))

    @property
    def crops(self) -> MultiCropConfig:
        """The effective crop settings: single-crop runs use one global crop and no locals."""
        mc = self.data.multicrop
        if self.data.use_multicrop:
            return mc
        return dataclasses.replace(mc, num_local_crops=0, num_global_crops=1, adaptive=False)

    def validate(self) -> Config:
        """Cross-field checks; raises :class:`ConfigError` naming the keys to change."""
        from hjepa_core.masks import MASKING_STRATEGIES

        mc, m, t = self.crops, self.model, self.training
        if mc.local_crop_size > mc.global_crop_size:
            raise ConfigError(
                f"data.multicrop.local_crop_size ({mc.local_crop_size}) must be <= "
                f"data.multicrop.global_crop_size ({mc.global_crop_size})"
            )
        for key, size in (("global_crop_size", mc.global_crop_size), ("local_crop_size", mc.local_crop_size)):
            if size % m.patch_size:
                raise ConfigError(
                    f"data.multicrop.{key}={size} is not divisible by model.patch_size={m.patch_size}"
                )
        if self.masking.strategy not in MASKING_STRATEGIES:
            raise ConfigError(
                f"masking.strategy={self.masking.strategy!r} is not one of {', '.join(MASKING_STRATEGIES)}"
            )
        fraction = self.masking.cross_crop_target_fraction  # its range: the mask generator's check below
        fewest = mc.min_local_crops if mc.adaptive else mc.num_local_crops
        if self.data.use_multicrop and self.masking.strategy == "cross_crop_prediction" and int(fewest * fraction) < 1:
            raise ConfigError(f"masking.strategy=cross_crop_prediction makes int({fewest} local crops x masking."
                              f"cross_crop_target_fraction {fraction}) = 0 of them targets: use more local crops "
                              "(data.multicrop.num_local_crops or min_local_crops) or a larger fraction")
        if len(self.loss.hierarchy_weights) != self.masking.num_hierarchies:
            raise ConfigError(
                f"loss.hierarchy_weights has {len(self.loss.hierarchy_weights)} entries but "
                f"masking.num_hierarchies={self.masking.num_hierarchies}; give one weight per level"
            )
        for key in ("local_weight", "local_level_weight", "image_weight", "vicreg_weight", "sigreg_weight"):
            value = getattr(self.loss, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss.{key} must be a finite number >= 0 (0 turns the term off), got {value}")
        if self.loss.type not in ("smooth_l1", "mse"):
            raise ConfigError(f"loss.type={self.loss.type!r} must be 'smooth_l1' or 'mse'")
        if m.predictor_embed_dim % m.predictor_num_heads:
            raise ConfigError("model.predictor_embed_dim must be divisible by model.predictor_num_heads")
        if m.predictor_depth < 1:  # queries carry no content: without a block they never see the context
            raise ConfigError(f"model.predictor_depth must be >= 1, got {m.predictor_depth}")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"training.precision={t.precision!r} must be auto, fp32, bf16 or fp16")
        if t.target_precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"training.target_precision={t.target_precision!r} must be auto, fp32 or bf16")
        for key in ("epochs", "batch_size", "accumulation_steps", "keep_last_checkpoints", "log_every"):
            if getattr(t, key) < 1:
                raise ConfigError(f"training.{key} must be >= 1, got {getattr(t, key)}")
        if t.time_budget_s is not None and not t.time_budget_s > 0:
            raise ConfigError(f"training.time_budget_s must be > 0 s (null: epoch schedule), got {t.time_budget_s}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"training.lr must be a finite number > 0 (e.g. training.lr=1.5e-4), got {t.lr}")
        if not (math.isfinite(t.min_lr) and t.min_lr >= 0):
            raise ConfigError(f"training.min_lr must be a finite number >= 0, got {t.min_lr}")
        if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
            raise ConfigError(f"training.grad_clip must be > 0 (the max gradient norm) or 0 to turn clipping "
                              f"off, got {t.grad_clip}")
        for key, value in (("training.max_steps", t.max_steps), ("data.max_samples", self.data.max_samples)):
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1 (or null for no limit), got {value}")
        for key, value, zero in (("training.checkpoint_every_steps", t.checkpoint_every_steps, "only at the end"),
                                 ("data.num_workers", self.data.num_workers or 0, "load in the main process"),
                                 ("data.knn_monitor_every", self.data.knn_monitor_every, "no monitor")):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0: {zero}), got {value}")
        if self.data.on_corrupt not in ("skip", "fail"):
            raise ConfigError(f"data.on_corrupt={self.data.on_corrupt!r}: use 'skip' (count corrupt shards) or 'fail'")
        if not 0.0 <= self.data.max_corrupt_fraction <= 1.0:
            raise ConfigError(f"data.max_corrupt_fraction must be in [0, 1], got {self.data.max_corrupt_fraction}")
        if not (math.isfinite(self.tracking.timeout_s) and self.tracking.timeout_s > 0):
            raise ConfigError(f"tracking.timeout_s must be > 0 seconds, got {self.tracking.timeout_s}")
        if self.loss.collapse_every < 1:
            raise ConfigError(f"loss.collapse_every must be >= 1, got {self.loss.collapse_every}")
        for key in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self.data.multicrop, key)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"data.multicrop.{key}=[{low}, {high}] must be [low, high] with "
                                  f"0 < low <= high <= 1 (fractions of the image area)")
        self._validate_dataset()
        if not 0.0 <= t.ema_momentum <= t.ema_momentum_end <= 1.0:
            raise ConfigError("need 0 <= training.ema_momentum <= training.ema_momentum_end <= 1")
        from hjepa_core.models.vit import resolve_encoder_size
        try:
            resolve_encoder_size(m)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.build_mask_generator()
        except ValueError as exc:
            raise ConfigError(f"masking: {exc}") from exc
        return self

    def _validate_dataset(self) -> None:
        """``data.dataset`` is a known dataset name (``NAME`` or ``NAME:PATH``) or a shard spec."""
        from hjepa_core.data.shards.spec import shard_spec_from
        from hjepa_core.data.sources import DATASET_NAMES

        d = self.data
        try:
            if shard_spec_from(d.dataset, d.data_path) is not None:
                return
        except ValueError as exc:
            raise ConfigError(f"data.dataset: {exc}") from exc
        name = d.dataset.partition(":")[0].lower().replace("-", "_")
        if name not in DATASET_NAMES:
            raise ConfigError(f"data.dataset={d.dataset!r} is not a known dataset; use one of "
                              f"{', '.join(DATASET_NAMES)}, imagefolder:PATH or shards:DIR")

    def check_environment(self) -> Config:
        """Checks what depends on this machine, before a run starts: an explicit raw-dataset
        ``data.data_path`` exists, and ``training.device`` is available. (Separate from
        :meth:`validate`, so a config written elsewhere, e.g. in a checkpoint, still loads.)"""
        import torch

        from hjepa_core.data.shards.spec import shard_spec_from

        d, device = self.data, self.training.device
        if d.data_path and shard_spec_from(d.dataset, d.data_path) is None and not Path(d.data_path).exists():
            raise ConfigError(f"data.data_path={d.data_path} does not exist; pass the folder holding the "
                              f"dataset, or data.data_path=null for the default location")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"training.device={device} but CUDA is not available on this machine; "
                              f"use training.device=cpu or auto")
        return self

    def build_mask_generator(self, seed: int | None = None):
        """The multi-crop mask generator these settings describe."""
        from hjepa_core.masks import MultiCropMaskGenerator

        mc, mk = self.crops, self.masking
        n_local = mc.max_local_crops if mc.adaptive else mc.num_local_crops
        return MultiCropMaskGenerator(
            global_crop_size=mc.global_crop_size,
            local_crop_size=mc.local_crop_size,
            num_global_crops=mc.num_global_crops,
            num_local_crops=n_local,
            masking_strategy=mk.strategy,
            num_hierarchies=mk.num_hierarchies,
            num_target_masks=mk.num_target_masks,
            base_scale=mk.base_scale,
            aspect_ratio_range=mk.aspect_ratio_range,
            patch_size=self.model.patch_size,
            level_scale_growth=mk.level_scale_growth,
            context_scale=mk.context_scale,
            min_context_patches=mk.min_context_patches,
            local_mask_ratio=mk.local_mask_ratio,
            cross_crop_target_fraction=mk.cross_crop_target_fraction,
            pad_targets=self.training.compile,  # static shapes only where a compiler needs them
            seed=seed,
        )


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            sub = flatten(value, f"{name}.")
            out.update(sub if sub else {name: value})
        else:
            out[name] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _annotation(key: str) -> Any:
    """The schema's annotation of ``key`` (``training.lr``, ``loss.hierarchy_weights[1]``,
    ``tracking.tags.team``), or None where the schema has no such key."""
    path, _, index = key.partition("[")
    annotation: Any = Config
    for part in path.split("."):
        annotation = _optional_inner(annotation)
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif _is_section(annotation) and part in _field_types(annotation):
            annotation = _field_types(annotation)[part]
        else:
            return None
    if index and typing.get_origin(_optional_inner(annotation)) in (list, tuple):
        return typing.get_args(_optional_inner(annotation))[0]
    return annotation


def _expected(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, for error messages."""
    annotation = _optional_inner(annotation)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return f"{len(typing.get_args(annotation))} values like [0.4, 1.0]"
    if origin is list:
        return "a list like [1.0, 0.5]"
    if origin is dict:
        return "a mapping"
    if _is_section(annotation):
        return f"a mapping of {annotation.__name__} fields"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _is_section(annotation: Any) -> typing.TypeGuard[type]:
    """A nested dataclass of the schema (``data.multicrop``), not a leaf."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in _field_types(cls).items():
        if _is_section(annotation):
            keys += _all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str) -> ConfigError:
    valid = _all_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    guesses = difflib.get_close_matches(key, valid, n=1, cutoff=0.5) or [
        k for k in valid if k.rsplit(".", 1)[-1] == leaf
    ][:1] or difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in valid], n=1)
    hint = f"; did you mean {guesses[0]!r}?" if guesses else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _config_error(exc: OmegaConfBaseException, key: str | None = None) -> ConfigError:
    """One line naming the key, from an OmegaConf error (``key``: the override being merged)."""
    full_key, value = exc.full_key or key or "", exc.value
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        return _unknown_key(key or full_key)
    annotation = _annotation(full_key)
    if isinstance(exc, InterpolationResolutionError) or not isinstance(exc, ValidationError) or annotation is None:
        return ConfigError(f"{full_key}: {_first_line(exc.msg)}")
    if isinstance(value, dict | DictConfig) and _optional_inner(annotation) in (int, float, bool, str):
        return _unknown_key(key or f"{full_key}.{next(iter(value), '')!s}")  # a key below a leaf
    if isinstance(value, Container):
        value = OmegaConf.to_container(value)
    got = f", got {value!r}" if exc.full_key else ""  # a failed merge of a section names no value
    return ConfigError(f"{full_key}: expected {_expected(annotation)}{got}")


def _merged(conf: DictConfig, values: Any, key: str | None = None) -> DictConfig:
    """``conf`` with ``values`` (a mapping) merged in, checked against the schema."""
    try:
        merged = OmegaConf.merge(conf, values)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, key) from None
    assert isinstance(merged, DictConfig)
    return merged


def _to_config(conf: DictConfig) -> Config:
    """The dataclasses (interpolations resolved) of a merged schema. OmegaConf 2.3 keeps a
    ``tuple[float, float]`` field as a list of any length: here its length is checked and the
    tuple given back, so callers see exactly the dataclass types."""
    try:
        config = OmegaConf.to_object(conf)
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    assert isinstance(config, Config)
    _restore_tuples(config)
    return config


def _restore_tuples(obj: Any, prefix: str = "") -> None:
    for name, annotation in _field_types(type(obj)).items():
        value, key = getattr(obj, name), f"{prefix}{name}"
        if _is_section(annotation):
            _restore_tuples(value, f"{key}.")
        elif typing.get_origin(annotation) is tuple:
            if len(value) != len(typing.get_args(annotation)):
                raise ConfigError(f"{key}: expected {_expected(annotation)}, got {list(value)}")
            setattr(obj, name, tuple(value))


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.lr=1e-4"`` -> ``("training.lr", 0.0001)``: the value read as OmegaConf reads a
    dotlist (YAML; ``${...}`` stays an interpolation), ``key=`` as the empty string. Two spellings
    the CLI took before OmegaConf still work: ``None`` for null, and a whole number such as ``1e3``
    or ``3.0`` for an integer field (OmegaConf's integer node refuses floats)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. training.lr=1e-4)")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw if raw.strip() else repr('')}"]))
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {text!r}: {_first_line(exc.msg)}") from None
    assert isinstance(parsed, dict)
    value = parsed["value"]
    annotation = _annotation(key)
    inner = _optional_inner(annotation)
    if inner is not annotation and isinstance(value, str) and value.lower() == "none":
        return key, None
    if inner is int and isinstance(value, float | str) and _is_whole(value):
        return key, int(float(value))
    return key, value


def _is_whole(value: float | str) -> bool:
    try:
        return float(value).is_integer()
    except ValueError:
        return False


def _first_line(message: object) -> str:
    return str(message).splitlines()[0] if str(message) else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``"expected ',' or ']' (line 2)"``: PyYAML's message on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or _first_line(exc)}{where}"


def _read_sections(path: str | Path, what: str) -> DictConfig:
    """The top-level mapping of a YAML file (read as OmegaConf reads YAML); a clear error naming
    the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; pass an existing YAML (see configs/)")
    text = path.read_text()
    try:
        values = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except OSError:  # OmegaConf.load's word for a scalar top level
        values = None
    if not isinstance(values, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                params: str | Path | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then the config sections of a DVC params file
    (``params``: its ``data``, ``masking``, ``model`` ... sections; the others are the DVC stages' own
    parameters), then ``key=value`` overrides; validated."""
    conf = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers.append((path, _read_sections(path, "config file")))
    if params is not None:
        values = _read_sections(params, "params file")
        sections = {f.name for f in dataclasses.fields(Config)}
        layers.append((params, OmegaConf.masked_copy(values, [k for k in values if k in sections])))
    for source, values in layers:
        try:
            conf = _merged(conf, values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for text in overrides or []:
        key, value = parse_override(text)
        try:  # a mapping merges into a section; tracking.tags=... replaces the tags, as before
            OmegaConf.update(conf, key, value, merge=typing.get_origin(_optional_inner(_annotation(key))) is not dict)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, key) from None
    return _to_config(conf).validate()


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a validated :class:`Config` from :meth:`Config.to_dict` output (checkpoints)."""
    return _to_config(_merged(OmegaConf.structured(Config), values)).validate()
