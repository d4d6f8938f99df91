import pytest
import torch

from hjepa_core.eval.features import (
    EvalError,
    FeatureCache,
    check_pooling,
    extract_features,
    load_encoder,
    open_source,
    pool_tokens,
)
from hjepa_core.models.vit import VisionTransformer


def test_poolings_shapes_and_levels():
    tokens = torch.randn(2, 64, 8)  # an 8x8 grid
    assert pool_tokens(tokens, "mean").shape == (2, 8)
    assert torch.allclose(pool_tokens(tokens, "mean"), tokens.mean(1))
    assert torch.equal(pool_tokens(tokens, "max"), tokens.amax(1))
    assert pool_tokens(tokens, "mean_max").shape == (2, 16)
    assert pool_tokens(tokens, "levels", levels=3).shape == (2, 24)
    level1 = pool_tokens(tokens, "level:1", levels=3)
    assert level1.shape == (2, 8) and not torch.allclose(level1, pool_tokens(tokens, "level:0", levels=3))
    with pytest.raises(EvalError, match="level:2"):
        check_pooling("level:5", 3)
    with pytest.raises(EvalError, match="not one of"):
        check_pooling("cls", 3)


def test_feature_cache_reuses_and_keys_by_content(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    key = {"kind": "encoder", "sha256": "abc", "split": "train", "pooling": "mean"}
    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(dict(key), compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    cache.get_or_compute({**key, "pooling": "max"}, compute)  # another key: computed again
    assert len(calls) == 2
    cache.path(key).write_bytes(b"damaged")  # a broken file is recomputed, not trusted
    cache.get_or_compute(key, compute)
    assert len(calls) == 3
    disabled = FeatureCache(None)
    disabled.get_or_compute(key, compute)
    disabled.get_or_compute(key, compute)
    assert len(calls) == 5


def test_extract_features_in_order_with_labels(tiny_source):
    encoder = VisionTransformer(patch_size=4, embed_dim=16, depth=1, num_heads=2)
    feats, labels = extract_features(encoder, tiny_source, 16, batch_size=5)
    assert feats.shape == (24, 16) and labels.tolist() == [i % 3 for i in range(24)]
    again, _ = extract_features(encoder, tiny_source, 16, batch_size=7)
    assert torch.allclose(feats, again, atol=1e-5)  # batching does not change features
    pixels, _ = extract_features(None, tiny_source, 16)
    assert pixels.dtype == torch.uint8 and pixels.shape == (24, 3 * 16 * 16)


def test_missing_and_bad_checkpoints_give_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EvalError, match="not a readable hjepa checkpoint"):
        load_encoder(garbage)
    no_config = tmp_path / "no_config.pt"
    torch.save({"state_dict": {}}, no_config)
    with pytest.raises(EvalError, match="no training config"):
        load_encoder(no_config)


def test_checkpoint_config_mismatch(tmp_path, tiny_checkpoint):
    from hjepa_core.config import load_config

    loaded = load_encoder(tiny_checkpoint)
    assert loaded.crop_size == 32 and loaded.encoder.embed_dim == 32 and not loaded.encoder.training
    assert load_encoder(tiny_checkpoint.parent).sha256 == loaded.sha256  # the output dir works too
    other = load_config("configs/fashion_mnist.yaml")  # embed_dim 128, depth 4
    with pytest.raises(EvalError, match=r"checkpoint/config mismatch.*embed_dim"):
        load_encoder(tiny_checkpoint, other)
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["arch"]["depth"] = 3  # arch no longer matches its stored config
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(EvalError, match="does not match its own stored config"):
        load_encoder(tmp_path / "edited.pt")
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["state_dict"].pop("norm.weight")
    torch.save(state, tmp_path / "truncated.pt")
    with pytest.raises(EvalError, match="weights do not fit"):
        load_encoder(tmp_path / "truncated.pt")


def test_training_checkpoint_loads_the_target_encoder(tiny_checkpoint):
    training_ckpt = sorted((tiny_checkpoint.parent / "checkpoints").glob("checkpoint-*.pt"))[-1]
    a, b = load_encoder(tiny_checkpoint).encoder, load_encoder(training_ckpt).encoder
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_wrong_dataset_is_a_clear_error():
    with pytest.raises(EvalError, match="unknown dataset 'mnist_typo'"):
        open_source("mnist_typo")
    with pytest.raises(EvalError, match="split"):
        open_source("fashion_mnist", split="validation")


def test_data_fingerprint_follows_the_files(tmp_path, image_folder):
    import os

    from hjepa_core.eval.features import data_fingerprint

    root = image_folder(per_class=2, classes=("a", "b"))
    first = data_fingerprint(f"imagefolder:{root}", None, "train")
    assert data_fingerprint("imagefolder", str(root), "test") == first
    os.utime(root / "a" / "0.png", ns=(1, 1))
    touched = data_fingerprint(f"imagefolder:{root}", None, "train")
    (root / "b" / "new.png").write_bytes((root / "b" / "0.png").read_bytes())
    assert len({first, touched, data_fingerprint(f"imagefolder:{root}", None, "train")}) == 3
