"""training.shapes: every family draws, scenes keep synthetic's guarantees, and the held-out
families, textures and backgrounds never reach training."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training import shapes
from training.shapes import (
    HELDOUT_BACKGROUNDS,
    HELDOUT_FAMILIES,
    HELDOUT_TEXTURES,
    OUT_OF_FAMILY_SCENES,
    TRAIN_BACKGROUNDS,
    TRAIN_FAMILIES,
    TRAIN_SCENES,
    TRAIN_TEXTURES,
    family_mask,
    make_scene,
    out_of_family,
    scenes_dataset,
)
from training.synthetic import HELDOUT_SEED, VALIDATION_SEED, Pixels, min_area


def test_setup_installed_the_glyph_fonts():
    # scripts/setup.sh installs them; a missing font must fail here, not skip the module.
    assert shapes.font_files(shapes.GLYPH_FONTS)
    assert shapes.font_files(shapes.SYMBOL_FONTS)


def test_held_out_names_are_disjoint_from_training_ones():
    assert not set(HELDOUT_FAMILIES) & set(TRAIN_FAMILIES)
    assert not set(HELDOUT_TEXTURES) & set(TRAIN_TEXTURES)
    assert not set(HELDOUT_BACKGROUNDS) & set(TRAIN_BACKGROUNDS)
    assert set(TRAIN_SCENES.families) <= set(TRAIN_FAMILIES)
    assert set(OUT_OF_FAMILY_SCENES.families) == set(HELDOUT_FAMILIES)
    assert shapes.OUT_OF_FAMILY_SEED not in (HELDOUT_SEED, VALIDATION_SEED)


@pytest.mark.parametrize("family", TRAIN_FAMILIES + HELDOUT_FAMILIES)
def test_every_family_draws_a_shape_about_its_size(family):
    rng = np.random.default_rng(3)
    for radius in (6.0, 40.0):
        mask = family_mask(rng, family, radius)
        assert mask.dtype == bool and mask.any()
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert extent <= 4 * radius + 8


def test_holes_stay_holes():
    rng = np.random.default_rng(1)
    mask = family_mask(rng, "holed", 60.0)
    # a hole: background pixels that no path along rows reaches from the crop's border
    filled = mask.copy()
    for row in filled:
        inside = np.nonzero(row)[0]
        if len(inside):
            row[inside[0] : inside[-1] + 1] = True
    assert (filled & ~mask).sum() > 0


def test_scenes_have_disjoint_visible_masks_above_the_minimum_area():
    for sample in scenes_dataset(4, 12, (160, 320)):
        assert sample.masks.sum(axis=0).max() <= 1
        assert sample.masks.sum(axis=(1, 2)).min() >= min_area(*sample.image.shape[:2])
        assert set(sample.kinds) <= set(TRAIN_FAMILIES)


def test_scenes_are_a_function_of_seed_and_index():
    first = list(scenes_dataset(8, 3, (160, 240)))
    again = list(scenes_dataset(8, 5, (160, 240)))[:3]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert a.kinds == b.kinds


def test_out_of_family_set_holds_only_held_out_families():
    samples = out_of_family(6)
    kinds = {kind for sample in samples for kind in sample.kinds}
    assert kinds <= set(HELDOUT_FAMILIES) and len(kinds) >= 3
    assert all(300 <= max(s.image.shape[:2]) <= 900 for s in samples)


def test_cell_clusters_touch():
    rng = np.random.default_rng(0)
    config = shapes.SceneConfig(families=("cell",), p_cluster=1.0)
    touching = 0
    for _ in range(5):
        sample = make_scene(rng, 256, 256, config)
        labels = np.argmax(np.concatenate([np.zeros((1, 256, 256)), sample.masks]), axis=0)
        edge = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        touching += bool(edge.any())
    assert touching >= 3


@pytest.mark.parametrize("texture", TRAIN_TEXTURES + HELDOUT_TEXTURES)
def test_every_texture_fills_every_pixel_with_more_than_one_colour(texture):
    rng = np.random.default_rng(2)
    mask = family_mask(rng, "ellipse", 30.0)
    pixels = Pixels.of(mask, -(mask.shape[0] - 1) / 2, -(mask.shape[1] - 1) / 2, 30.0)
    values = shapes._texture(rng, texture, np.array([120.0, 80.0, 40.0]), pixels)
    assert values.shape == (int(mask.sum()), 3) and values.dtype == np.uint8
    assert texture == "flat" or len(np.unique(values, axis=0)) > 1


@pytest.mark.parametrize("background", TRAIN_BACKGROUNDS + HELDOUT_BACKGROUNDS)
def test_every_background_paints_a_varied_image(background):
    image = shapes.BACKGROUNDS[background](np.random.default_rng(5), 120, 200)
    assert image.shape == (120, 200, 3) and image.dtype == np.uint8
    assert image.std() > 3.0


def test_compound_shapes_are_one_connected_piece():
    rng = np.random.default_rng(9)
    for _ in range(10):
        mask = family_mask(rng, "compound", 40.0)
        count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
        assert count == 2  # the background and one piece
