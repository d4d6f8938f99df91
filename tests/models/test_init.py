"""The encoder's initialisation lets patch content, not position, dominate the target tokens.

With a position-dominated init (I-JEPA's trunc-normal std 0.02 on a 48-input patch embedding)
76% of the target tokens' variance was position and pooled embeddings of real images had an
effective rank of ~5; a predictor then lowers the loss by learning positions alone.
"""

import torch
import torch.nn.functional as F

from hjepa_core.config import load_config
from hjepa_core.eval.features import normalize_pixels, open_source, pixel_batches
from hjepa_core.losses import collapse_metrics
from hjepa_core.models import build_hjepa


def _target_tokens(samples: int = 1024) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = load_config("configs/fashion_mnist.yaml", ["tracking.enabled=false"])
    encoder = build_hjepa(cfg).target_encoder.eval()
    source = open_source("fashion_mnist", None, "train", samples)
    pixels = torch.cat([batch[0] for batch in pixel_batches(source, 32, 512)])
    with torch.no_grad():
        tokens = encoder(normalize_pixels(pixels))
    return F.layer_norm(tokens, tokens.shape[-1:])


def position_variance_share(tokens: torch.Tensor) -> float:
    """Share of the tokens' total variance explained by their grid position (between-position
    variance of the per-position means over the total variance)."""
    centered = tokens - tokens.mean(dim=(0, 1))
    between = centered.mean(dim=0).pow(2).sum(-1).mean()
    total = centered.pow(2).sum(-1).mean()
    return float(between / total)


def test_position_is_a_minority_of_target_token_variance_at_init():
    share = position_variance_share(_target_tokens())
    assert share < 0.45, f"{share:.2f} of target-token variance is position at init"


def test_pooled_embeddings_of_real_images_are_not_low_rank_at_init():
    rank = collapse_metrics(_target_tokens().mean(dim=1))["collapse/effective_rank"]
    assert rank > 12.0, rank
