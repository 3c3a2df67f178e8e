"""Augmentation policies: RandAugment and TrivialAugment built from Albumentations ops, usable from YAML."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

import transferkit as tk
from transferkit.data.augment import augmentations, build_train_transform
from transferkit.data.policies import OP_LISTS, policy
from transferkit.reporting.previews import pipeline_text

NORM = ((0.5,) * 3, (0.5,) * 3)


def halves() -> np.ndarray:
    """A gray image, dark on the left (60), bright on the right (200), with some texture."""
    image = np.full((48, 48, 3), 60, dtype=np.uint8)
    image[:, 24:] = 200
    image[::6] += 10
    return image


def test_a_policy_from_the_recipe_is_an_albumentations_pipeline_that_round_trips():
    (rand,) = augmentations([{"RandAugment": {"num_ops": 2, "magnitude": 9, "ops": "photometric_safe"}}])
    assert (
        isinstance(rand, A.SomeOf)
        and rand.n == 2
        and len(rand.transforms) == len(OP_LISTS["photometric_safe"])
    )
    (trivial,) = augmentations([{"TrivialAugment": {"ops": ["rotate", "contrast"]}}])
    assert isinstance(trivial, A.OneOf) and len(trivial.transforms) == 2
    pipeline = build_train_transform(
        [{"HorizontalFlip": {"p": 0.5}}, {"RandAugment": {"num_ops": 3, "magnitude": 7}}], 32, *NORM
    )
    again = A.from_dict(A.to_dict(pipeline))
    for seed in range(5):  # the same draws from the pipeline read back
        pipeline.set_random_seed(seed)
        again.set_random_seed(seed)
        assert np.array_equal(pipeline(image=halves())["image"], again(image=halves())["image"])
    assert "SomeOf" in pipeline_text(pipeline) and "Affine" in pipeline_text(
        pipeline
    )  # what augment-preview lists


def test_magnitude_scales_the_change_from_nothing_to_strong():
    image = halves()
    changes = {}
    for magnitude in (0, 5, 10):
        pipeline = A.Compose([policy("RandAugment", num_ops=3, magnitude=magnitude, ops="photometric_safe")])
        diffs = []
        for seed in range(30):
            pipeline.set_random_seed(seed)
            diffs.append(np.abs(pipeline(image=image)["image"].astype(int) - image).mean())
        changes[magnitude] = float(np.mean(diffs))
    assert changes[0] < 0.5 and changes[0] < changes[5] < changes[10]


def test_photometric_safe_never_remaps_intensities_as_solarize_does():
    image = halves()
    geometry = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}  # these move pixels, not values
    intensity = [op for op in OP_LISTS["photometric_safe"] if op not in geometry]
    safe = A.Compose([policy("RandAugment", num_ops=2, magnitude=10, ops=intensity)])
    solarize = A.Compose([policy("TrivialAugment", ops=["solarize"])])
    flipped = {"safe": 0, "solarize": 0}
    for seed in range(40):
        for name, pipeline in (("safe", safe), ("solarize", solarize)):
            pipeline.set_random_seed(seed)
            out = pipeline(image=image)["image"].astype(float)
            # the bright half stays brighter than the dark half under any change a camera could make
            flipped[name] += bool(out[:, 30:42].mean() <= out[:, 6:18].mean())
    assert flipped["safe"] == 0 and flipped["solarize"] > 5
    assert not {"saturation", "equalize", "posterize", "solarize"} & set(OP_LISTS["photometric_safe"])


def test_policy_settings_are_checked_when_the_recipe_is_read():
    for item, message in (
        ({"RandAugment": {"magnitude": 11}}, "magnitude is on a 0-10 scale"),
        ({"RandAugment": {"ops": "colourful"}}, "unknown op list 'colourful'"),
        ({"TrivialAugment": {"ops": ["rotate", "warp"]}}, "unknown policy ops \\['warp'\\]"),
        ({"RandAugment": {"num_ops": 0}}, "num_ops must be between 1 and the 13 ops"),
        ({"TrivialAugment": {"num_ops": 2}}, "TrivialAugment takes magnitude, ops, p; got num_ops"),
    ):
        with pytest.raises(tk.ConfigError, match=message):
            tk.ImageDataModule(
                source="digits",
                pipeline={"augment": [item], "image_size": 32, "mean": NORM[0], "std": NORM[1]},
            )
