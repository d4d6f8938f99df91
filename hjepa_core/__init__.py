"""hjepa_core: H-JEPA (hierarchical I-JEPA) pretraining with multi-crop."""

__version__ = "0.1.0"
