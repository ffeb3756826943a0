"""The streamed loader's per-image transforms: RandomResizedCrop, the evaluation resize + centre crop, the paper's
raug15 policy (op list, level range, fills), and batch-level random erasing / mixup / cutmix."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from repopt.data import DataError  # noqa: E402
from repopt.data.batch_aug import BatchAugmented, mix, random_erase  # noqa: E402
from repopt.data.randaugment import CUTOUT_FILL, FILL, OPS, RandAugment15, apply_op, level_argument  # noqa: E402
from repopt.data.transforms import (EvalTransform, TrainTransform, center_box, resize_shorter,  # noqa: E402
                                    rrc_box, train_transform)


def photo(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return Image.fromarray(low).resize((w, h), Image.BILINEAR)


# -- RandomResizedCrop ------------------------------------------------------------------------------------------------
def test_rrc_boxes_stay_inside_and_follow_the_scale_and_ratio_ranges():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(3000):
        left, top, w, h = rrc_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375 and w > 0 and h > 0
        areas.append(w * h / (500 * 375))
        ratios.append(w / h)
    assert 0.07 < min(areas) < 0.1 and max(areas) == pytest.approx(1.0, abs=0.02)
    assert 0.74 < min(ratios) and max(ratios) < 1.35
    # area uniform in [0.08, 1] before rejection: the mean of the accepted ones sits a little below 0.54
    assert 0.40 < np.mean(areas) < 0.56


def test_rrc_falls_back_to_a_centred_window_on_extreme_images():
    class Never(random.Random):  # every attempt asks for the whole area at the widest ratio: never fits a 1000x10
        def uniform(self, a, b):
            return b

    assert rrc_box(1000, 10, Never(0)) == ((1000 - 13) // 2, 0, 13, 10)  # width clamped to 4/3 of the height
    assert rrc_box(10, 1000, Never(0)) == (0, (1000 - 13) // 2, 10, 13)  # height clamped to 4/3 of the width


def test_resize_and_centre_crop_rules():
    assert resize_shorter(500, 375, 224) == (298, 224) and resize_shorter(375, 500, 224) == (224, 298)
    assert center_box(298, 224, 224) == (37, 0, 261, 224)
    t = EvalTransform(224)
    x = t(photo(500, 375))
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    ref = photo(500, 375).resize((298, 224), Image.BILINEAR).crop((37, 0, 261, 224))
    assert torch.equal(x, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))
    assert EvalTransform(224, 256)(photo(500, 375)).shape == (3, 224, 224)
    with pytest.raises(DataError, match="at least the image size"):
        EvalTransform(224, 200)


@pytest.mark.parametrize("policy", ["rrc-flip", "raug15", "none"])
def test_train_transform_shape_range_and_determinism(policy):
    t = train_transform(32, policy, backend="pillow")
    img = photo(80, 60)
    a, b = t(img, random.Random(5)), t(img, random.Random(5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    if policy != "none":
        others = [t(img, random.Random(s)) for s in range(6, 12)]
        assert any(not torch.equal(a, o) for o in others)
    with pytest.raises(DataError, match="unknown augmentation policy"):
        TrainTransform(32, "autoaugment")


def test_rrc_flip_is_a_resized_window_of_the_source():
    img = photo(80, 60)
    t = TrainTransform(32, "rrc-flip", backend="pillow")
    rng = random.Random(3)
    x = t(img, rng)
    rng = random.Random(3)
    left, top, w, h = rrc_box(80, 60, rng)
    ref = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR)
    if rng.random() < 0.5:
        ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(x, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))


# -- raug15 ------------------------------------------------------------------------------------------------------------
def test_raug15_op_list_and_level_range_are_the_papers():
    assert OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")
    policy = RandAugment15()
    draws = [d for s in range(400) for d in policy.draw(random.Random(s))]
    assert len(draws) == 800 and {op for op, _ in draws} == set(OPS)
    assert {level for _, level in draws} == set(range(15))  # 0..14, uniform integers
    rng = random.Random(0)
    top = {op: level_argument(op, 14, rng) for op in OPS}
    assert abs(top["Rotate"]) == pytest.approx(42.0) and top["Color"] == pytest.approx(2.62)
    assert abs(top["ShearX"]) == pytest.approx(0.42) and abs(top["TranslateY"]) == pytest.approx(0.63)
    assert top["Posterize"] == 5 and top["Solarize"] == 358 and top["SolarizeAdd"] == 154
    assert top["Cutout"] == pytest.approx(56.0) and level_argument("Cutout", 0, rng) == 2.0
    assert level_argument("Brightness", 0, rng) == pytest.approx(0.1) and level_argument("Invert", 7, rng) is None
    assert {math.copysign(1, level_argument("Rotate", 10, random.Random(s))) for s in range(20)} == {-1.0, 1.0}


def test_raug15_operations_do_what_they_say():
    img = photo(40, 30)
    a = np.asarray(img).astype(int)
    rng = random.Random(0)
    assert (np.asarray(apply_op(img, "Invert", None, rng)) == 255 - a).all()
    assert (np.asarray(apply_op(img, "Posterize", 0, rng)) == 0).all()  # 0 bits kept: black, as in the reference
    assert (np.asarray(apply_op(img, "Posterize", 2, rng)) == (a & 0xC0)).all()
    added = np.asarray(apply_op(img, "SolarizeAdd", 100, rng)).astype(int)
    assert (added == np.where(a < 128, np.minimum(a + 100, 255), a)).all()
    assert (np.asarray(apply_op(img, "Solarize", 256, rng)) == a).all()
    assert (np.asarray(apply_op(img, "Brightness", 1.0, rng)) == a).all()
    cut = np.asarray(apply_op(img, "Cutout", 10.0, random.Random(1)))
    filled = (cut == CUTOUT_FILL).all(-1)
    assert filled.sum() > 0 and filled.sum() <= 100
    moved = np.asarray(apply_op(img, "TranslateX", 0.5, rng))
    assert (moved[:, 21:] == FILL).all()  # content moved left by half the width, grey where nothing came from
    for op in OPS:  # every operation runs on RGB at both ends of the range and keeps the size and mode
        for level in (0, 14):
            out = apply_op(img, op, level_argument(op, level, rng), rng)
            assert out.size == img.size and out.mode == "RGB", op


def test_raug15_is_deterministic_per_generator_seed():
    policy, img = RandAugment15(), photo(48, 48)
    a = np.asarray(policy(img, random.Random(11)))
    assert (a == np.asarray(policy(img, random.Random(11)))).all()
    assert any((a != np.asarray(policy(img, random.Random(s)))).any() for s in range(12, 20))


# -- batch-level ---------------------------------------------------------------------------------------------------
def test_mixup_and_cutmix_give_soft_targets_that_match_the_pixels():
    rng = np.random.default_rng(0)
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xm, t = mix(x, y, 5, rng, mixup=0.8, cutmix=0.0)
    lam = float(t[1, 1])  # image 1 (class 1) mixed with image 4 (class 4)
    torch.testing.assert_close(xm[1], lam * x[1] + (1 - lam) * x[4])
    assert torch.allclose(t.sum(1), torch.ones(6))
    xc, t = mix(x, y, 5, np.random.default_rng(1), mixup=0.0, cutmix=1.0)
    kept = (xc[1] == x[1]).all(0).float().mean()
    assert float(t[1, 1]) == pytest.approx(float(kept), abs=1e-6) and torch.allclose(t.sum(1), torch.ones(6))
    # F.cross_entropy's label smoothing on soft targets equals smoothing each one-hot before mixing (the reference)
    logits = torch.randn(6, 5)
    smooth = torch.nn.functional.one_hot(y, 5) * 0.9 + 0.02
    lam = float(np.random.default_rng(2).beta(0.8, 0.8))
    soft = torch.nn.functional.one_hot(y, 5) * lam + torch.nn.functional.one_hot(y.flip(0), 5) * (1 - lam)
    ref = -(torch.log_softmax(logits, 1) * (smooth * lam + smooth.flip(0) * (1 - lam))).sum(1).mean()
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, soft.float(), label_smoothing=0.1), ref)


def test_random_erasing_fills_one_rectangle_per_chosen_image():
    x = torch.zeros(8, 3, 20, 20)
    random_erase(x, 1.0, np.random.default_rng(0))
    changed = (x != 0).any(1)
    for k in range(8):
        rows, cols = changed[k].any(1).nonzero(), changed[k].any(0).nonzero()
        assert len(rows) and int(changed[k].sum()) == (int(rows.max() - rows.min()) + 1) * \
            (int(cols.max() - cols.min()) + 1)
    assert (random_erase(torch.zeros(4, 3, 8, 8), 0.0, np.random.default_rng(0)) == 0).all()
    with pytest.raises(DataError, match="random erasing probability"):
        BatchAugmented(None, random_erase=1.5)


def test_torchvision_backend_gives_the_same_pixels():
    """Runs where torchvision imports (not beside torch 2.13 here: see docs/benchmarks.md for the venv it ran in)."""
    from repopt.data.transforms import resolve_backend

    if resolve_backend("auto") != "torchvision":
        pytest.skip("torchvision does not import here")
    from torchvision.transforms import v2

    img = photo(97, 61)
    for policy in ("rrc-flip", "raug15"):
        pil, tv = TrainTransform(32, policy, "pillow"), TrainTransform(32, policy, "torchvision")
        for seed in range(10):
            assert torch.equal(pil(img, random.Random(seed)), tv(img, random.Random(seed))), (policy, seed)
    for resize in (None, 40):
        ours = EvalTransform(32, resize, "pillow")(img)
        reference = v2.Compose([v2.Resize(resize or 32, antialias=True), v2.CenterCrop(32)])(img)
        assert torch.equal(ours, torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1))
