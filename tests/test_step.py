"""training.step and the vectorised prompts: the training decoder is SAM's, prompts land where
they should, and the losses reward the right mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.augment import Batch
from training.prompts import (
    choose_instances,
    error_clicks,
    jitter_boxes,
    mask_box,
    mask_boxes,
    random_points,
)
from training.step import StepConfig, batch_loss, decode_masks, mask_losses, sample_prompts


def _labels() -> torch.Tensor:
    """A 64x64 label map: instance 1 a square, 2 a bar, 3 a single pixel."""
    labels = torch.zeros(64, 64, dtype=torch.uint8)
    labels[10:30, 5:25] = 1
    labels[40:44, 8:60] = 2
    labels[60, 60] = 3
    return labels


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_training_decoder_matches_sams_mask_decoder(micro_sam, multimask, with_mask):
    torch.manual_seed(0)
    encoder, decoder = micro_sam.prompt_encoder, micro_sam.mask_decoder
    embedding = torch.randn(1, encoder.embed_dim, *encoder.image_embedding_size)
    points = (torch.rand(5, 2, 2) * 256, torch.tensor([[1, 0]] * 5, dtype=torch.int))
    masks = torch.randn(5, 1, 64, 64) if with_mask else None
    sparse, dense = encoder(
        points=points, boxes=torch.tensor([[10.0, 20, 90, 120]] * 5), masks=masks
    )
    with torch.no_grad():
        expected, expected_iou = decoder(
            image_embeddings=embedding,
            image_pe=encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        logits, iou = decode_masks(
            decoder,
            embedding,
            encoder.get_dense_pe(),
            sparse,
            dense if with_mask else dense[:1],
            multimask,
        )
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=1e-4)


def test_mask_losses_reward_the_right_mask():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    right = (target * 20 - 10)[:, None]
    loss, ious = mask_losses(torch.cat([right, -right], dim=1), target, focal_weight=20)
    assert loss.shape == ious.shape == (2, 2)
    assert (loss[:, 0] < 0.01).all() and (loss[:, 1] > 1).all()
    assert torch.equal(ious, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_instances_below_the_minimum_get_no_prompts():
    g = torch.Generator().manual_seed(0)
    chosen = choose_instances(_labels(), 50, min_pixels=2, generator=g)
    assert set(chosen.tolist()) == {1, 2}
    assert choose_instances(torch.zeros(8, 8, dtype=torch.uint8), 3, 1, g) is None


def test_points_and_boxes_come_from_their_masks():
    labels = _labels()
    masks = labels[None] == torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        points = random_points(masks, g)
        for mask, (x, y) in zip(masks, points):
            assert mask[int(y), int(x)] and x % 1 == 0.5 and y % 1 == 0.5
    for mask, box in zip(masks, mask_boxes(masks)):
        assert box.tolist() == mask_box(mask.numpy())
    jittered = jitter_boxes(mask_boxes(masks), (50, 62), g)
    assert (jittered >= 0).all() and (jittered[:, [0, 2]] <= 62).all()
    assert (jittered[:, [1, 3]] <= 50).all()


def test_error_clicks_go_to_the_larger_error():
    truth = torch.zeros(3, 16, 16, dtype=torch.bool)
    truth[:, 4:12, 4:12] = True
    pred = truth.clone()
    pred[0, 4:12, 4:8] = False  # misses half: a positive click in the missed part
    pred[1, 0:4, :] = True  # adds a band: a negative click in it
    points, labels = error_clicks(pred, truth, torch.Generator().manual_seed(0))
    (x0, y0), (x1, y1), (x2, y2) = points.tolist()
    assert labels.tolist() == [1, 0, 1]
    assert truth[0, int(y0), int(x0)] and not pred[0, int(y0), int(x0)]
    assert pred[1, int(y1), int(x1)] and not truth[1, int(y1), int(x1)]
    assert truth[2, int(y2), int(x2)]  # no error: a click on the object


def test_prompts_targets_and_loss_of_a_batch(micro_sam):
    labels = torch.zeros(2, 256, 256, dtype=torch.uint8)
    labels[0, 40:120, 30:90] = 1
    labels[0, 150:200, 150:250] = 2
    batch = Batch(torch.randn(2, 3, 256, 256), labels, [(256, 256), (200, 256)])
    config = StepConfig(prompts_per_image=4)
    g = torch.Generator().manual_seed(0)
    prompts = sample_prompts(labels[0], (256, 256), 64, config, g)
    assert prompts.targets.shape == (4, 64, 64) and prompts.points.shape == (4, 1, 2)
    assert ((prompts.targets == 0) | (prompts.targets == 1)).float().mean() > 0.95
    embeddings = micro_sam.image_encoder(batch.inputs).detach().requires_grad_()
    loss, parts = batch_loss(micro_sam, decode_masks, embeddings, batch, config, g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert "refine" in parts and len(parts["refine"]) == 1  # the second image has no instance
    loss.backward()
    assert embeddings.grad is not None and np.isfinite(embeddings.grad.numpy()).all()


def test_random_points_stay_inside_when_a_draw_rounds_up_to_the_box_edge(monkeypatch):
    """u just below 1 times a 256-pixel side is 256.0 in float32: the point must still be
    the box's last pixel (this draw once stopped a long training run with an IndexError)."""
    masks = torch.ones(2, 256, 256, dtype=torch.bool)
    masks[1, :, 200:] = False
    real_rand = torch.rand

    def almost_one(*size, **kwargs):
        return torch.full(size[0] if isinstance(size[0], tuple) else size, 0.99999994)

    monkeypatch.setattr(torch, "rand", almost_one)
    points = random_points(masks, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "rand", real_rand)
    assert points.tolist() == [[255.5, 255.5], [199.5, 255.5]]
