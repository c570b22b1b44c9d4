"""The training loop on the tiny sam_micro: schedule, resuming, checkpoints, fine-tuning,
and evaluation code paths (quality is tested elsewhere)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samserve.models import SamSpec, build_sam
from training import checkpoints as saved
from training.evaluate import (
    COUNT_PARAMS,
    count_objects,
    evaluate,
    grid_ceiling,
    heldout,
    in_process_predictor,
    iou,
    tune_count,
    validation,
)
from training.prompts import corrective_click, jittered_box, mask_box
from training.shapes import TRAIN_SCENES
from training.shards import RenderConfig
from training.step import StepConfig
from training.synthetic import Sample
from training.train import TrainConfig, config_from_args, learning_rate, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """One folder for the datasets of every test here: each config renders once."""
    return str(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def tiny(data_root):
    """``make(folder, **changes)``: sam_micro on 12 rendered 256-px images, 2 images and 3
    prompts a step, 4 steps, the run's folders in ``folder``; ``changes`` replace fields."""

    def make(folder, **changes) -> TrainConfig:
        config = TrainConfig(
            run="tiny",
            spec="sam_micro",
            data=RenderConfig(count=12, image_size=256),
            data_root=data_root,
            images_per_step=2,
            step=StepConfig(prompts_per_image=3),
            total_steps=4,
            warmup_steps=1,
            lr=1e-3,
            log_every=1,
            committed_root=str(folder / "committed"),
            local_root=str(folder / "local"),
        )
        return dataclasses.replace(config, **changes)

    return make


def quiet(message: str) -> None:
    """A log that drops every line."""


def test_learning_rate_warms_up_then_decays_over_the_total_steps():
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=1010)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(510, config) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(1010, config) == pytest.approx(1e-5)
    assert learning_rate(5000, config) == pytest.approx(1e-5)


def test_command_line_reaches_nested_settings():
    config = config_from_args(
        ["--image-size", "256", "--stem-channels", "8", "16", "32", "64", "--prompts-per-image",
         "5", "--augment-enabled", "false", "--data-count", "99", "--autocast", "none"]
    )  # fmt: skip
    assert config.data.image_size == 256 and config.data.count == 99
    assert config.stem_channels == (8, 16, 32, 64) and config.step.prompts_per_image == 5
    assert not config.augment.enabled and config.autocast == "none"
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_short_run_writes_a_loadable_half_model_and_its_log(tmp_path, tiny):
    config = tiny(tmp_path, total_steps=3)
    sam = train(config, log=quiet)
    folder = tmp_path / "committed" / "tiny"
    state = torch.load(folder / "model.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = build_sam(SamSpec.from_dict(json.loads((folder / "model.json").read_text())["spec"]),
                       folder / "model.pth")  # fmt: skip
    torch.testing.assert_close(
        loaded.mask_decoder.iou_token.weight,
        sam.mask_decoder.iou_token.weight,
        atol=1e-3,
        rtol=1e-3,
    )
    summary = json.loads((folder / "model.json").read_text())
    assert summary["steps"] == 3 and summary["spec"]["image_size"] == 256
    log = (folder / "log.txt").read_text()
    assert "step      3" in log and "finished" in log


def _weights(sam) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sam.state_dict().items()}


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny):
    whole = _weights(train(tiny(tmp_path / "whole"), log=quiet))
    first = tiny(tmp_path / "parts", session_steps=2)
    train(first, log=quiet)
    path = tmp_path / "parts" / "local" / "tiny" / "checkpoint.pth"
    assert saved.load(path)["step"] == 2
    # A resumed session takes its settings from the checkpoint: this lr would change them.
    second = dataclasses.replace(
        tiny(tmp_path / "parts"), resume=str(path), lr=0.5, session_steps=0
    )
    resumed = _weights(train(second, log=quiet))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_a_resumed_run_keeps_its_length_unless_extended(tmp_path, tiny):
    """The command line's default ``total_steps`` must not shorten a resumed run: only
    ``extend_to`` changes its length."""
    from training.train import _session_config, config_from_args

    first = tiny(tmp_path, session_steps=1, total_steps=7)
    train(first, log=quiet)
    path = tmp_path / "local" / "tiny" / "checkpoint.pth"
    again, _ = _session_config(config_from_args(["--resume", str(path)]))
    assert again.total_steps == 7
    longer, _ = _session_config(config_from_args(["--resume", str(path), "--extend-to", "40"]))
    assert longer.total_steps == 40


def test_a_compact_checkpoint_resumes_close_to_the_exact_one(tmp_path, tiny):
    first = tiny(tmp_path, session_steps=2)
    train(first, log=quiet)
    compact = tmp_path / "committed" / "tiny" / "checkpoint.pth"
    exact = tmp_path / "local" / "tiny" / "checkpoint.pth"
    assert compact.stat().st_size < exact.stat().st_size / 2
    loaded = saved.load(compact)
    assert loaded["format"] == saved.COMPACT and loaded["step"] == 2
    after = {}
    for name, path in (("exact", exact), ("compact", compact)):
        config = dataclasses.replace(tiny(tmp_path / name), resume=str(path), session_steps=0)
        after[name] = _weights(train(config, log=quiet))
    for key, value in after["exact"].items():
        if value.is_floating_point():
            torch.testing.assert_close(after["compact"][key], value, atol=2e-2, rtol=0)


def test_second_moments_survive_their_one_byte_code():
    values = torch.cat([torch.zeros(3), torch.logspace(-12, -2, 1000)])
    decoded = saved._decode_log(saved._encode_log(values))
    assert torch.equal(decoded[:3], torch.zeros(3))
    assert ((decoded[3:] / values[3:]) - 1).abs().max() < 0.1


# A finished run's model, or any run's committed checkpoint (stage B starts from stage A's).
@pytest.mark.parametrize("init_file", ["model.pth", "checkpoint.pth"])
def test_init_from_a_smaller_input_size_keeps_the_weights(tmp_path, tiny, init_file):
    small = tiny(tmp_path / "small", total_steps=1)
    before = train(small, log=quiet)
    # one step at learning rate 0: the model written is the resized initialisation
    large = tiny(
        tmp_path / "large",
        init=str(tmp_path / "small" / "committed" / "tiny" / init_file),
        data=RenderConfig(count=12, image_size=512),
        total_steps=1,
        lr=0.0,
        min_lr=0.0,
    )
    train(large, log=quiet)
    folder = tmp_path / "large" / "committed" / "tiny"
    spec = SamSpec.from_dict(json.loads((folder / "model.json").read_text())["spec"])
    assert spec.image_size == 512
    after = build_sam(spec, folder / "model.pth")
    assert after.image_encoder.pos_embed.shape == (1, 32, 32, 64)
    assert after.prompt_encoder.mask_input_size == (128, 128)
    for name in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        torch.testing.assert_close(
            after.state_dict()[name], before.state_dict()[name], atol=1e-3, rtol=1e-3
        )
    # the position embedding is the old one resized: its mean survives bicubic resizing
    old, new = before.image_encoder.pos_embed, after.image_encoder.pos_embed
    torch.testing.assert_close(new.mean(dim=(1, 2)), old.mean(dim=(1, 2)), atol=2e-3, rtol=0)


def test_frozen_encoder_stays_and_the_decoder_trains(tmp_path, tiny):
    first = tiny(tmp_path / "a", total_steps=1)
    before = train(first, log=quiet).state_dict()
    second = tiny(
        tmp_path / "b",
        init=str(tmp_path / "a" / "committed" / "tiny" / "model.pth"),
        total_steps=3,
        freeze_encoder=True,
        lr=1e-2,
    )
    after = train(second, log=quiet).state_dict()
    changed = {k for k in before if not torch.equal(before[k].half(), after[k].half())}
    assert changed and all(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)


def test_a_conv_stem_run_trains_and_serves(tmp_path, tiny):
    config = tiny(tmp_path, total_steps=2, stem_channels=(8, 16, 32, 64))
    train(config, log=quiet)
    folder = tmp_path / "committed" / "tiny"
    spec = SamSpec.from_dict(json.loads((folder / "model.json").read_text())["spec"])
    assert spec.stem_channels == (8, 16, 32, 64)
    sam = build_sam(spec, folder / "model.pth")
    assert "image_encoder.patch_embed.convs.0.weight" in sam.state_dict()
    predict = in_process_predictor(None, folder / "checkpoint.pth")
    metrics = evaluate(predict, heldout(1))
    assert 0 <= metrics["box"] <= 1


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


def test_a_new_run_draws_its_data_versions_catalogue():
    # version 1 is what the shipped model's stages A and B trained on (their saved config)
    folder = Path(__file__).resolve().parent.parent / "training" / "runs" / "s36-512"
    saved_config = saved.load(folder / "checkpoint.pth")["config"]
    assert (
        config_from_args(["--data-version", "1"]).data == TrainConfig.from_dict(saved_config).data
    )
    assert config_from_args([]).data.scenes == TRAIN_SCENES
    assert config_from_args([]).data.version == 2


def test_grid_ceiling_loses_thin_lines_not_large_discs():
    image = np.zeros((400, 400, 3), np.uint8)
    ys, xs = np.ogrid[:400, :400]
    disc = (ys - 200) ** 2 + (xs - 150) ** 2 <= 80**2
    line = np.zeros((400, 400), bool)
    line[50:350, 320:322] = True  # 2 px wide: 0.6 of one grid cell at 256 input
    sample = Sample(image=image, masks=np.stack([disc, line]), kinds=("ellipse", "stroke"))
    ceiling = grid_ceiling([sample], 256)
    assert ceiling["ellipse"] > 0.97
    assert ceiling["stroke"] < 0.5
    assert ceiling["all"] == pytest.approx((ceiling["ellipse"] + ceiling["stroke"]) / 2, abs=1e-4)
    assert grid_ceiling([sample], 1024)["stroke"] > ceiling["stroke"]


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
    assert metrics["best_score_near_best_mask"] >= metrics["best_score_is_best_mask"]


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


def test_tuned_mask_nms_counts_as_the_server_counts_with_it():
    # tune_count applies mask NMS to one run's records itself; the server must agree
    shipped = Path(__file__).resolve().parent.parent / "models" / "sam_small_shapes.pth"
    predict = in_process_predictor("sam_small", shipped)
    valid = validation(2)
    loose = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    grid = {name: [value] for name, value in loose.items()} | {"mask_nms_thresh": [1.0, 0.3]}
    tuned = {r["params"]["mask_nms_thresh"]: r for r in tune_count(predict, valid, grid)}
    for threshold, result in tuned.items():
        params = {**COUNT_PARAMS, **loose, "mask_nms_thresh": threshold}
        assert result == count_objects(predict, valid, params)
    # the NMS dropped masks: fewer of them, so fewer over-counts
    assert tuned[0.3]["mean_abs_count_error"] < tuned[1.0]["mean_abs_count_error"]


def test_boxes_from_masks():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:22] = True
    assert mask_box(mask) == [10.0, 5.0, 22.0, 9.0]
    x0, y0, x1, y1 = jittered_box(mask, np.random.default_rng(0))
    assert abs(x0 - 10) <= 2 and abs(x1 - 22) <= 2 and 0 <= y0 and y1 <= 20
    empty = np.zeros((4, 4), bool)
    (x, y), label = corrective_click(empty, empty, np.random.default_rng(0))
    assert label == 1 and 0 <= x <= 4 and 0 <= y <= 4


def test_profile_table_splits_a_step_into_its_phases(tmp_path, tiny):
    from training.profile_step import STEP, ProfileConfig, table, time_steps

    timings = time_steps(ProfileConfig(tiny(tmp_path), steps=2, warmup=1))
    assert {"data", "encoder_forward", "decoder_backward", "optimizer", STEP} <= set(timings)
    assert all(len(values) == 2 for values in timings.values())
    text = table(timings)
    assert "| encoder_backward |" in text and "| other |" in text and "steps/s" in text
