"""Models: ViT encoder, hierarchical predictor and the H-JEPA wrapper."""

from hjepa_core.models.hjepa import HJEPA, HJEPAOutput, build_hjepa
from hjepa_core.models.predictor import HierarchicalPredictor, source_positions
from hjepa_core.models.vit import VIT_PRESETS, VisionTransformer, build_encoder, resolve_encoder_size

__all__ = [
    "HJEPA",
    "VIT_PRESETS",
    "HJEPAOutput",
    "HierarchicalPredictor",
    "VisionTransformer",
    "build_encoder",
    "build_hjepa",
    "resolve_encoder_size",
    "source_positions",
]
