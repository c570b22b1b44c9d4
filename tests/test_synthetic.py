"""Tests for training.synthetic: determinism, mask/image agreement, content and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from training import synthetic
from training.synthetic import (
    HELDOUT_SEED,
    KINDS,
    TRAIN_SEED,
    Sample,
    dataset,
    make_sample,
    min_area,
    sample_size,
)

LONG_SIDE = (96, 320)


def labels_of(sample: Sample) -> np.ndarray:
    """HxW int map: 0 for background, k + 1 where mask k is set (masks must be disjoint)."""
    labels = np.zeros(sample.image.shape[:2], dtype=np.int64)
    for k, mask in enumerate(sample.masks):
        labels[mask] = k + 1
    return labels


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return list(dataset(TRAIN_SEED + 7, 50, long_side=LONG_SIDE))


def assert_same(a: Sample, b: Sample) -> None:
    assert a.image.tobytes() == b.image.tobytes()
    assert a.masks.shape == b.masks.shape
    assert a.masks.tobytes() == b.masks.tobytes()
    assert a.kinds == b.kinds


def test_same_seed_gives_byte_identical_samples():
    for a, b in zip(dataset(3, 4, LONG_SIDE), dataset(3, 4, LONG_SIDE), strict=True):
        assert_same(a, b)


def test_different_seeds_and_indices_differ():
    first = next(dataset(1, 1))
    other_seed = next(dataset(2, 1))
    other_index = list(dataset(1, 2))[1]
    for other in (other_seed, other_index):
        assert first.image.shape != other.image.shape or not np.array_equal(
            first.image, other.image
        )
    assert TRAIN_SEED != HELDOUT_SEED
    held_out, train = next(dataset(HELDOUT_SEED, 1)), next(dataset(TRAIN_SEED, 1))
    assert held_out.image.shape != train.image.shape or not np.array_equal(
        held_out.image, train.image
    )


def test_sample_i_depends_only_on_seed_and_index():
    short, long = list(dataset(11, 3, LONG_SIDE)), list(dataset(11, 8, LONG_SIDE))
    for i in range(3):
        assert_same(short[i], long[i])
    rng = np.random.default_rng([11, 5])  # the documented recipe
    height, width = sample_size(rng, LONG_SIDE)
    assert_same(long[5], make_sample(rng, height, width))


def test_shapes_dtypes_and_counts(samples):
    for sample in samples:
        height, width, channels = sample.image.shape
        assert channels == 3 and sample.image.dtype == np.uint8
        assert LONG_SIDE[0] <= max(height, width) <= LONG_SIDE[1]
        assert sample.masks.dtype == np.bool_
        assert sample.masks.shape == (len(sample.kinds), height, width)
        assert 1 <= len(sample.kinds) <= 6
        assert set(sample.kinds) <= set(KINDS)
    assert max(len(s.kinds) for s in samples) >= 5  # not always a single object
    rng = np.random.default_rng(0)
    assert all(len(make_sample(rng, 128, 96, max_objects=1).kinds) == 1 for _ in range(10))
    assert all(len(make_sample(rng, 128, 96, max_objects=2).kinds) <= 2 for _ in range(10))


def test_masks_are_disjoint_and_above_min_area(samples):
    for sample in samples:
        assert sample.masks.sum(axis=0).max() <= 1
        areas = sample.masks.sum(axis=(1, 2))
        assert areas.min() >= min_area(*sample.image.shape[:2])
        assert areas.min() >= 30


def test_every_kind_appears(samples):
    assert {kind for sample in samples for kind in sample.kinds} == set(KINDS)


def test_objects_overlap_or_touch_sometimes(samples):
    touching = 0
    for sample in samples:
        labels = labels_of(sample)
        horizontal = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        vertical = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
        touching += bool(horizontal.any() or vertical.any())
    assert touching >= 5


def test_flat_fills_match_their_colour_exactly():
    flat = 0
    for index in range(30):
        rng = np.random.default_rng([5, index])
        sample, placed = synthetic._generate(rng, 160, 200, 6)
        assert len(placed) == len(sample.kinds)
        for mask, obj in zip(sample.masks, placed, strict=True):
            pixels = sample.image[mask]
            if obj.texture == "flat":
                flat += 1
                assert (pixels == np.array(obj.colour, dtype=np.uint8)).all()
            else:
                assert len(np.unique(pixels, axis=0)) > 1  # textured fills vary
    assert flat >= 10


def test_background_is_noisy_and_not_uniform(samples):
    for sample in samples:
        background = sample.image[~sample.masks.any(axis=0)].astype(np.float64)
        assert background.std(axis=0).min() > 2.0
        neighbour_diff = np.diff(sample.image.astype(np.int16), axis=1)
        assert np.abs(neighbour_diff).mean() > 1.5  # per-pixel noise, not only smooth shading


def test_ring_rasterisation_has_a_hole():
    ring = synthetic._Geometry(
        "ring", cy=50.0, cx=60.0, a=30.0, b=20.0, angle=0.5, radius=25.0, inner=0.5
    )
    y0, x0, mask = synthetic._rasterise(ring, 100, 120)
    full = np.zeros((100, 120), dtype=bool)
    full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    assert not full[50, 60]
    assert not full[45:56, 55:66].any()  # the hole's middle is empty
    row = full[50]
    assert row[:60].any() and row[60:].any()  # band on both sides of the hole
    expected = np.pi * 30.0 * 20.0 * (1.0 - 0.5**2)
    assert abs(full.sum() - expected) < 0.05 * expected


def test_unoccluded_rings_in_samples_enclose_their_hole():
    checked = 0
    for index in range(60):
        rng = np.random.default_rng([9, index])
        sample, placed = synthetic._generate(rng, 200, 200, 6)
        for mask, obj in zip(sample.masks, placed, strict=True):
            g = obj.geometry
            if g.kind != "ring":
                continue
            cy, cx = round(g.cy), round(g.cx)
            inside = 0 <= cy < 200 and 0 <= cx < 200
            if inside:
                assert not mask[cy, cx]
            y0, x0, drawn = synthetic._rasterise(g, 200, 200)
            within = y0 > 0 and x0 > 0 and y0 + drawn.shape[0] < 200 and x0 + drawn.shape[1] < 200
            if not (inside and within) or mask.sum() != drawn.sum():
                continue  # partly off the image or partly covered by a later object
            assert mask[cy, :cx].any() and mask[cy, cx + 1 :].any()
            assert mask[:cy, cx].any() and mask[cy + 1 :, cx].any()
            checked += 1
    assert checked >= 5


def test_sample_size_range_and_aspect():
    rng = np.random.default_rng(0)
    sizes = [sample_size(rng, (64, 512)) for _ in range(1000)]
    longs = np.array([max(s) for s in sizes])
    shorts = np.array([min(s) for s in sizes])
    assert longs.min() >= 64 and longs.max() <= 512
    assert longs.min() < 80 and longs.max() > 490  # uniform over the range
    assert (2 * shorts >= longs).all()  # aspect ratio within 1:2 .. 2:1
    ratios = longs / shorts
    assert ratios.max() > 1.9 and ratios.min() < 1.05  # the whole range of aspect ratios
    assert sum(h > w for h, w in sizes) > 300 and sum(h < w for h, w in sizes) > 300
    assert {max(sample_size(rng, (256, 256))) for _ in range(50)} == {256}


def test_invalid_arguments_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_sample(rng, 16, 64)
    with pytest.raises(ValueError):
        make_sample(rng, 64, 64, max_objects=0)
    with pytest.raises(ValueError):
        sample_size(rng, (300, 200))
    with pytest.raises(ValueError):
        next(dataset(-1, 1))


def test_fast_enough():
    rng = np.random.default_rng(0)
    make_sample(rng, 256, 256)  # builds the shared noise bank once
    start = time.perf_counter()
    for _ in range(50):
        make_sample(rng, 256, 256)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"50 samples of 256x256 took {elapsed:.2f} s"
