from dataclasses import asdict

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hcc_assets.core.figures import plot_history
from hcc_assets.deep import (
    ClassifierConfig,
    as_volume_batch,
    build_classifier,
    embed,
    load_model,
    predict_proba,
    save_model,
    train_classifier,
)

# Small and quick for tests; the study's values are ClassifierConfig's defaults.
TINY = dict(depth=10, lr=0.01, min_epochs=2, max_epochs=4, patience=2, seed=4)


def bce(model, volumes, labels):
    with torch.no_grad():
        logits = model.eval()(as_volume_batch(volumes))
    targets = torch.tensor(labels, dtype=torch.float32)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item()


@pytest.fixture(scope="module")
def trained(train_cohort, val_cohort):
    return train_classifier(*train_cohort, *val_cohort, ClassifierConfig(**{**TINY, "max_epochs": 12}))


def test_defaults_are_the_study():
    config = ClassifierConfig()
    study = (config.depth, config.embedding_dim, config.lr, config.momentum, config.batch_size)
    assert study == (50, 128, 0.001, 0.9, 8)
    assert (config.min_epochs, config.patience, config.use_trunk_cache) == (50, 10, True)
    with pytest.raises(ValidationError, match="max_epochs"):
        ClassifierConfig(min_epochs=50, max_epochs=20)


@pytest.mark.parametrize("depth, layout", [(10, "monai"), (18, "medicalnet")])
def test_cached_trunk_gives_the_full_network_logits_and_gradients(train_cohort, depth, layout):
    model = build_classifier(depth=depth, layout=layout, seed=1)
    volumes, labels = as_volume_batch(train_cohort[0][:4]), torch.tensor(train_cohort[1][:4], dtype=torch.float32)
    with torch.no_grad():
        cached = model.eval().frozen_features(volumes)
        assert torch.allclose(model.head(cached)[0], model(volumes), atol=1e-4)

    def head_gradients(logits):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    model.train()
    full = head_gradients(model(volumes))
    from_cache = head_gradients(model.head(cached)[0])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(full, from_cache))
    assert all(p.grad is None for p in model.frozen_parameters())


def test_cached_and_naive_training_agree(train_cohort, val_cohort):
    config = ClassifierConfig(**{**TINY, "max_epochs": 2})
    cached = train_classifier(*train_cohort, *val_cohort, config)
    naive = train_classifier(*train_cohort, *val_cohort, config.model_copy(update={"use_trunk_cache": False}))
    for a, b in zip(cached.history, naive.history, strict=True):
        assert np.allclose([a.train_loss, a.val_loss], [b.train_loss, b.val_loss], rtol=1e-4)
        assert (a.train_acc, a.val_acc) == (b.train_acc, b.val_acc)


def test_training_beats_chance_and_is_deterministic(trained, train_cohort, val_cohort):
    volumes, labels = train_cohort
    accuracy = np.mean((predict_proba(trained.model, volumes) > 0.5) == labels)
    assert accuracy >= 0.9 and trained.final_metrics["train_acc"] == accuracy
    assert [r.epoch for r in trained.history] == list(range(1, len(trained.history) + 1))
    assert trained.init.startswith("seeded-random") and trained.timings["seconds_per_epoch"] > 0

    again = train_classifier(*train_cohort, *val_cohort, trained.config)
    losses = lambda result: [(r.train_loss, r.val_loss) for r in result.history]  # noqa: E731
    assert np.allclose(losses(again), losses(trained), rtol=1e-6, atol=0)
    assert np.array_equal(embed(again.model, volumes), embed(trained.model, volumes))


def test_early_stopping_restores_the_best_weights(train_cohort, val_cohort):
    # Inverted validation labels: the better it fits training data the worse validation gets.
    volumes, labels = val_cohort
    config = ClassifierConfig(**{**TINY, "max_epochs": 30})
    lines: list[str] = []
    result = train_classifier(*train_cohort, volumes, 1 - labels, config, progress=lines.append)

    assert result.stopped_early
    # progress: the trunk cache, then one line per epoch with its losses and an ETA range
    assert lines[0].startswith("trunk cache:") and len(lines) == 1 + len(result.history)
    assert lines[1].startswith(f"epoch 1/{config.max_epochs}: train loss ") and "ETA " in lines[1]
    assert f"val loss {result.history[-1].val_loss:.4f}" in lines[-1]
    assert len(result.history) == max(config.min_epochs, result.best_epoch + config.patience) < config.max_epochs
    best = min(result.history, key=lambda r: r.val_loss)
    assert result.best_epoch == best.epoch == result.best_record.epoch
    assert bce(result.model, volumes, 1 - labels) == pytest.approx(best.val_loss, abs=1e-5)
    assert result.final_metrics["val_loss"] == pytest.approx(best.val_loss, abs=1e-6)


def test_training_returns_its_cohort_probabilities_as_the_network_computes_them(trained, train_cohort, val_cohort):
    """The final evaluation's P(HCC) (on the trunk cache, in batches) are the network's: what
    hcc_classifier records for its cohort without a second pass through the trunk."""
    for volumes, labels, computed in (
        (*train_cohort, trained.train_probabilities),
        (*val_cohort, trained.val_probabilities),
    ):
        assert computed.dtype == np.float32 and computed.shape == (len(labels),)
        np.testing.assert_allclose(computed, predict_proba(trained.model, volumes, batch_size=1), rtol=0, atol=1e-5)
    # and they are what its reported accuracy counted
    hits = (trained.val_probabilities > 0.5) == np.asarray(val_cohort[1], bool)
    assert hits.mean() == pytest.approx(trained.final_metrics["val_acc"])


def test_checkpoint_round_trips(trained, val_cohort, tmp_path):
    volumes = val_cohort[0]
    save_model(trained, tmp_path / "model")
    loaded = load_model(tmp_path / "model")

    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["classifier.json", "classifier.pt"]  # no temp
    assert np.array_equal(predict_proba(loaded.model, volumes), predict_proba(trained.model, volumes))
    assert np.array_equal(embed(loaded.model, volumes), embed(trained.model, volumes))
    assert loaded.config == trained.config and loaded.history == trained.history
    summary = lambda result: (result.best_epoch, result.init, result.final_metrics)  # noqa: E731
    assert summary(loaded) == summary(trained)
    # the training's own P(HCC) of its cohort come back bit for bit
    assert np.array_equal(loaded.train_probabilities, trained.train_probabilities)
    assert np.array_equal(loaded.val_probabilities, trained.val_probabilities)

    bare = build_classifier(depth=10, seed=9)
    save_model(bare, tmp_path / "bare", ClassifierConfig(depth=10))
    assert load_model(tmp_path / "bare").history == []


def test_embedding_is_float32_128_wide_and_deterministic(trained, val_cohort):
    volumes = list(val_cohort[0])  # a list of (X, Y, Z) arrays is accepted as well
    first, second = embed(trained.model, volumes, batch_size=3), embed(trained.model, volumes, batch_size=3)
    assert first.shape == (8, 128) and first.dtype == np.float32
    assert np.array_equal(first, second)
    # Bit-identical for the same batch size; another batch size may pick other conv kernels.
    assert np.allclose(first, embed(trained.model, volumes, batch_size=1), rtol=1e-5, atol=1e-6)
    assert (first >= 0).all()  # post-ReLU
    assert predict_proba(trained.model, volumes).shape == (8,)


def test_inputs_are_validated(train_cohort, val_cohort):
    volumes, labels = train_cohort
    with pytest.raises(ValueError, match="16 volumes but 3 labels"):
        train_classifier(volumes, labels[:3], *val_cohort, ClassifierConfig(**TINY))
    with pytest.raises(ValueError, match="0/1"):
        train_classifier(volumes, labels * 2, *val_cohort, ClassifierConfig(**TINY))
    broken = volumes[:2].copy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        as_volume_batch(broken)
    assert as_volume_batch(volumes[:, None]).shape == (16, 1, 32, 32, 16)


def test_plot_history_is_a_png(trained):
    png = plot_history(trained.history, best_epoch=trained.best_epoch)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert plot_history([asdict(r) for r in trained.history]).startswith(b"\x89PNG")


def test_amp_on_a_cpu_means_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    from hcc_assets.deep import cpu_bf16_active

    assert not cpu_bf16_active("cpu", amp=False)
    assert not cpu_bf16_active("cuda:0", amp=True)  # CUDA: autocast of its own
    for has_it in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has_it=has_it: has_it, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert cpu_bf16_active("cpu", amp=True) is has_it


@pytest.mark.skipif(
    not __import__("hcc_assets.deep", fromlist=["cpu_bf16_active"]).cpu_bf16_active("cpu", True),
    reason="this CPU has no bfloat16 instructions: amp has no effect on it",
)
def test_amp_on_a_cpu_computes_the_frozen_trunk_in_bfloat16_repeatably(train_cohort, val_cohort, tmp_path):
    """amp on a CPU with bfloat16 instructions: the frozen trunk (the cache) in bfloat16, layer4 and
    the head in float32. The same seed gives the same weights, and a saved and reloaded model
    embeds exactly as the trained one (its trunk runs in bfloat16 again)."""
    config = ClassifierConfig(**TINY, amp=True)
    first, second = (train_classifier(*train_cohort, *val_cohort, config) for _ in range(2))
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert all(p.dtype == torch.float32 for p in first.model.parameters())
    volumes = val_cohort[0]
    save_model(first, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert first.model.bfloat16_on_cpu and loaded.model.bfloat16_on_cpu
    in_bf16 = embed(loaded.model, volumes, batch_size=1)
    assert np.array_equal(in_bf16, embed(first.model, volumes, batch_size=1))
    # bfloat16 inputs to the trunk's convolutions: close to the float32 network's embeddings, not equal
    loaded.model.use_bfloat16_on_cpu(False)
    in_fp32 = embed(loaded.model, volumes, batch_size=1)
    assert not np.array_equal(in_bf16, in_fp32)
    assert np.abs(in_bf16 - in_fp32).max() < 0.05 * np.abs(in_fp32).max()
