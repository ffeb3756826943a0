"""The recipe's defaults: the paper's per-256 learning rate scaled with the global batch, wd 4e-5, 5/120 warmup."""
import math

import pytest

from repopt.app.recipes import describe_lr, scaled_lr
from repopt.app.train import TrainConfig, TrainingError


def test_sgd_default_is_the_papers_rate_per_256_images():
    cfg = TrainConfig(batch_size=64, epochs=12).resolve()
    assert cfg.lr == pytest.approx(0.025) and cfg.lr_base == 0.1
    assert cfg.weight_decay == 4e-5
    assert cfg.warmup_epochs == pytest.approx(12 * 5 / 120)
    assert TrainConfig(batch_size=256).resolve().lr == pytest.approx(0.1)
    assert TrainConfig(batch_size=1024).resolve().lr == pytest.approx(0.4)


def test_adaptive_optimizers_scale_by_the_square_root():
    cfg = TrainConfig(optimizer="adamw", batch_size=64).resolve()
    assert cfg.lr == pytest.approx(4e-3 * math.sqrt(64 / 256))
    assert TrainConfig(optimizer="lion", batch_size=1024).resolve().lr == pytest.approx(4e-4 * 2)


def test_explicit_values_win():
    cfg = TrainConfig(batch_size=64, lr=0.05, weight_decay=1e-4, warmup_epochs=2).resolve()
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == (0.05, 1e-4, 2)
    assert TrainConfig(batch_size=128, lr_base=0.2).resolve().lr == pytest.approx(0.1)
    assert TrainConfig(batch_size=128, lr_base=0.2, lr_base_size=128).resolve().lr == pytest.approx(0.2)


def test_resolve_is_idempotent():
    cfg = TrainConfig(batch_size=32).resolve()
    lr = cfg.lr
    assert cfg.resolve().lr == lr


def test_the_run_prints_its_effective_rate():
    cfg = TrainConfig(batch_size=64, epochs=12).resolve()
    text = cfg.describe()
    assert "lr 0.025 (0.1 per 256 images x 64/256, linear scaling)" in text and "weight decay 4e-05" in text
    assert describe_lr(0.05, None, 64, "linear") == "0.05 (given with --lr)"
    assert scaled_lr(0.1, 32, "linear") == pytest.approx(0.0125)


@pytest.mark.parametrize("field,value,flag", [("lr_base", 0.0, "--lr-base"), ("lr_base_size", 0, "--lr-base-size"),
                                              ("warmup_epochs", -1.0, "--warmup-epochs")])
def test_bad_recipe_values_are_named(field, value, flag):
    with pytest.raises(TrainingError, match=flag):
        TrainConfig(**{field: value}).validate()
