"""Training and evaluation code paths, on the tiny sam_micro (quality is tested elsewhere)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from samserve.models import SamSpec, build_sam, spec_by_name
from training.evaluate import (
    evaluate,
    heldout,
    in_process_predictor,
    iou,
    tune_count,
    validation,
)
from training.prompts import corrective_click, jittered_box, mask_box
from training.train import (
    TrainConfig,
    draw_images,
    learning_rate,
    mask_losses,
    step_draws,
    to_model,
    train,
)


def test_mask_losses_reward_the_right_mask():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    right = (target * 20 - 10)[:, None]
    wrong = -right
    loss, ious = mask_losses(torch.cat([right, wrong], dim=1), target, focal_weight=20)
    assert loss.shape == ious.shape == (2, 2)
    assert (loss[:, 0] < 0.01).all() and (loss[:, 1] > 1).all()
    assert torch.equal(ious, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert learning_rate(0.0, config, 0) == pytest.approx(1e-4)
    assert learning_rate(0.1, config, 9) == pytest.approx(1e-3)
    assert learning_rate(0.5, config, 500) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(1.0, config, 1000) == pytest.approx(1e-5)


def test_batch_is_in_the_model_frame(micro_sam):
    config = TrainConfig(images_per_step=3, long_side=(200, 500))
    drawn = draw_images(np.random.default_rng(0), config, 256, 64)
    batch = to_model(micro_sam, drawn)
    assert batch.inputs.shape == (3, 3, 256, 256)
    for targets, full in zip(batch.masks, batch.full):
        assert targets.shape[1:] == (64, 64) and targets.min() >= 0 and targets.max() <= 1
        assert max(full.shape[1:]) == 256 and len(full) == len(targets)


def test_worker_processes_draw_what_the_loop_draws():
    """Steps drawn ahead in worker processes (for a GPU) are the loop's own, in order,
    and leave each step's generator where the loop would (it goes on to the prompts)."""
    config = TrainConfig(images_per_step=2, long_side=(100, 200))
    runs = {}
    for workers in (0, 2):
        with step_draws(dataclasses.replace(config, workers=workers), 256, 64) as draws:
            runs[workers] = [next(draws) for _ in range(5)]
    for (inline, inline_rng), (ahead, ahead_rng) in zip(runs[0], runs[2], strict=True):
        for a, b in zip(inline[0] + inline[1], ahead[0] + ahead[1], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(inline[2], ahead[2], strict=True):
            np.testing.assert_array_equal(a, b)
        assert inline_rng.bit_generator.state == ahead_rng.bit_generator.state
    assert not torch.equal(runs[0][0][0][0][0], runs[0][1][0][0][0])  # steps differ


def test_short_training_run_writes_a_loadable_half_checkpoint(tmp_path):
    out = tmp_path / "model.pth"
    config = TrainConfig(spec="sam_micro", steps=3, images_per_step=2, prompts_per_image=3)
    sam = train(config, out, log=lambda message: None)
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = build_sam(spec_by_name("sam_micro"), out)
    torch.testing.assert_close(
        loaded.mask_decoder.iou_token.weight,
        sam.mask_decoder.iou_token.weight,
        atol=1e-3,
        rtol=1e-3,
    )
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] == 3 and summary["spec"]["name"] == "sam_micro"


def test_init_from_a_smaller_input_size_keeps_the_weights(tmp_path):
    small, large = tmp_path / "256.pth", tmp_path / "512.pth"
    config = TrainConfig(spec="sam_micro", steps=1, images_per_step=1, prompts_per_image=2)
    before = train(config, small, log=lambda message: None)
    # one step at learning rate 0: the written model is the resized initialisation
    config = dataclasses.replace(config, init=str(small), image_size=512, lr=0.0, min_lr=0.0)
    train(config, large, log=lambda message: None)

    summary = json.loads(large.with_suffix(".json").read_text())
    assert summary["spec"]["image_size"] == 512
    spec = SamSpec.from_dict(summary["spec"])
    after = build_sam(spec, large)
    assert after.image_encoder.pos_embed.shape == (1, 32, 32, 64)
    assert after.prompt_encoder.mask_input_size == (128, 128)
    # size-free weights carry over unchanged (fp16 storage aside)
    for name in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        torch.testing.assert_close(
            after.state_dict()[name], before.state_dict()[name], atol=1e-3, rtol=1e-3
        )
    # the position embedding is the old one resized: its mean survives bicubic resizing
    old, new = before.image_encoder.pos_embed, after.image_encoder.pos_embed
    torch.testing.assert_close(new.mean(dim=(1, 2)), old.mean(dim=(1, 2)), atol=2e-3, rtol=0)
    logits, _ = after.mask_decoder(
        image_embeddings=after.image_encoder(torch.zeros(1, 3, 512, 512)),
        image_pe=after.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.zeros(1, 0, 64),
        dense_prompt_embeddings=after.prompt_encoder.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        ).expand(1, -1, 32, 32),
        multimask_output=True,
    )
    assert logits.shape == (1, 3, 128, 128)


def test_frozen_encoder_stays_and_the_decoder_trains(tmp_path):
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    config = TrainConfig(spec="sam_micro", steps=1, images_per_step=1, prompts_per_image=2)
    before = train(config, first, log=lambda message: None).state_dict()
    config = dataclasses.replace(config, init=str(first), steps=3, freeze_encoder=True, lr=1e-2)
    after = train(config, second, log=lambda message: None).state_dict()
    changed = {k for k in before if not torch.equal(before[k].half(), after[k].half())}
    assert changed and all(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)


def test_iou_andcorrective_click():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros((10, 10), bool)
    b[4:8, 4:8] = True
    assert iou(a, b) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0
    rng = np.random.default_rng(0)
    (x, y), label = corrective_click(np.zeros_like(a), a, rng)
    assert label == 1 and a[int(y), int(x)]
    (x, y), label = corrective_click(b | a, a, rng)
    assert label == 0 and b[int(y), int(x)] and not a[int(y), int(x)]


def test_heldout_set_is_fixed():
    first, second = heldout(2), heldout(2)
    assert np.array_equal(first[1].image, second[1].image)
    assert 300 <= max(first[0].image.shape[:2]) <= 900


def test_evaluation_runs_through_the_protocol(checkpoints):
    metrics = evaluate(in_process_predictor("sam_micro", checkpoints["sam_micro"]), heldout(2))
    assert metrics["images"] == 2 and metrics["instances"] >= 2
    for key in ("point", "point_oracle", "box", "point_box", "refine_round2"):
        assert 0 <= metrics[key] <= 1
    assert metrics["point_oracle"] >= metrics["point"]
    assert metrics["refine_round1"] == metrics["point"]


def test_count_thresholds_are_tuned_on_the_validation_set_not_the_heldout_one(checkpoints):
    valid, held = validation(2), heldout(2)
    assert not np.array_equal(valid[0].image[:32, :32], held[0].image[:32, :32])
    predict = in_process_predictor("sam_micro", checkpoints["sam_micro"])
    grid = {"pred_iou_thresh": [0.0, 0.99], "points_per_side": [4]}
    results = tune_count(predict, valid[:1], grid)
    assert sorted(r["params"]["pred_iou_thresh"] for r in results) == [0.0, 0.99]
    rates = [(-r["exact_count_rate"], r["mean_abs_count_error"]) for r in results]
    assert rates == sorted(rates)  # best first
    strict = next(r for r in results if r["params"]["pred_iou_thresh"] == 0.99)
    loose = next(r for r in results if r["params"]["pred_iou_thresh"] == 0.0)
    assert strict["precision"] <= 1 and loose["recall"] >= strict["recall"]


def test_boxes_from_masks():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:22] = True
    assert mask_box(mask) == [10.0, 5.0, 22.0, 9.0]
    x0, y0, x1, y1 = jittered_box(mask, np.random.default_rng(0))
    assert abs(x0 - 10) <= 2 and abs(x1 - 22) <= 2 and 0 <= y0 and y1 <= 20
    empty = np.zeros((4, 4), bool)
    (x, y), label = corrective_click(empty, empty, np.random.default_rng(0))
    assert label == 1 and 0 <= x <= 4 and 0 <= y <= 4
