"""Training: the engine, schedules, optimiser groups, checkpoints and DDP setup."""

from hjepa_core.train.engine import ENCODER_FILE, METRICS_FILE, Trainer, TrainResult, save_encoder, train

__all__ = ["ENCODER_FILE", "METRICS_FILE", "TrainResult", "Trainer", "save_encoder", "train"]
