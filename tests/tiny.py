"""A tiny CPU configuration shared by training tests (seconds per run on 2 cores)."""

TINY_OVERRIDES = [
    "data.max_samples=256",
    "data.num_workers=0",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.predictor_embed_dim=32",
    "model.predictor_depth=1",
    "model.predictor_num_heads=2",
    "training.batch_size=16",
    "training.log_every=2",
    "training.time_budget_s=null",  # an epoch schedule (the config trains for a time budget)
    "tracking.enabled=false",
]


def tiny_overrides(output_dir, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"training.output_dir={output_dir}", *extra]
