"""training.shards and training.augment: a rendered dataset is the stream it was rendered
from, in the model's frame, and augmentation moves labels with their pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.augment import AugmentConfig, augment, batch_for_step, step_indices
from training.shards import FAMILIES, RenderConfig, ShardDataset, draw_sample, render, to_frame
from training.synthetic import HELDOUT_SEED

CONFIG = RenderConfig(count=6, image_size=128, long_side=(100, 260))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ShardDataset:
    return ShardDataset(render(CONFIG, tmp_path_factory.mktemp("data"), workers=1))


def test_stored_images_are_the_stream_resized_into_the_frame(dataset):
    assert len(dataset) == 6 and dataset.image_size == 128
    for index in range(len(dataset)):
        sample = draw_sample(CONFIG, index)
        image, labels = to_frame(sample, 128)
        stored_image, stored_labels = dataset.item(index)
        assert max(stored_labels.shape) == 128
        assert np.array_equal(stored_image, image) and np.array_equal(stored_labels, labels)
        assert np.all(dataset.images[index, image.shape[0] :] == 0)  # zero padding
        kinds = [FAMILIES[k] for k in dataset.families[index] if k >= 0]
        assert kinds == list(sample.kinds)
        assert labels.max() <= len(sample.kinds)


def test_rendering_again_reuses_the_folder_and_refuses_another_config(dataset):
    assert render(CONFIG, dataset.folder.parent) == dataset.folder
    # same folder name (seed, count, size), other contents: refused, not silently reused
    with pytest.raises(ValueError, match="another dataset"):
        render(dataclasses.replace(CONFIG, classic_share=0.5), dataset.folder.parent)


def test_no_evaluation_seed_is_rendered():
    with pytest.raises(ValueError):
        draw_sample(dataclasses.replace(CONFIG, seed=HELDOUT_SEED), 0)


def test_labels_move_with_their_pixels():
    labels = np.zeros((96, 128), np.uint8)
    labels[10:50, 20:70] = 1
    labels[60:90, 80:120] = 2
    image = np.repeat((labels * 100)[:, :, None], 3, axis=2).astype(np.uint8)
    config = AugmentConfig(p_zoom=1.0, p_colour=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        pixels, moved = augment(image, labels, 128, config, g)
        assert pixels.shape[1:] == moved.shape and max(moved.shape) <= 128
        agree = (pixels[0].round() == moved.float() * 100).float().mean()
        assert agree > 0.9  # all but the blurred edges


def test_steps_read_every_image_once_per_epoch():
    seen = [i for step in range(6) for i in step_indices(step, 12, 2, seed=3)]
    assert sorted(seen) == list(range(12))
    assert step_indices(7, 12, 2, seed=3) == step_indices(7, 12, 2, seed=3)
    assert seen != [i for step in range(6) for i in step_indices(step, 12, 2, seed=4)]


def test_a_batch_is_normalised_padded_and_repeatable(dataset):
    mean, std = torch.tensor([100.0, 110, 120])[:, None, None], torch.full((3, 1, 1), 50.0)
    batches = [
        batch_for_step(
            dataset, [0, 3], mean, std, AugmentConfig(), torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    ]
    assert batches[0].inputs.shape == (2, 3, 128, 128) and batches[0].labels.shape == (2, 128, 128)
    assert torch.equal(batches[0].inputs, batches[1].inputs)
    assert torch.equal(batches[0].labels, batches[1].labels)
    for slot, (h, w) in enumerate(batches[0].sizes):
        assert (batches[0].inputs[slot, :, h:] == 0).all() and (
            batches[0].labels[slot, :, w:] == 0
        ).all()
