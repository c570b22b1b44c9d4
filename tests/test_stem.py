"""A convolutional stem chosen by the spec: same token grid, same engine, SamPredictor parity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from segment_anything import SamPredictor

from conftest import make_image
from samserve.engine import Prompt, SamEngine
from samserve.models import ConvStem, SamSpec, build_sam, random_checkpoint, spec_by_name

STEM_SPEC = dataclasses.replace(
    spec_by_name("sam_micro"), name="sam_micro_conv", stem_channels=(8, 16, 32, 64)
)


@pytest.fixture(scope="module")
def stem_sam(tmp_path_factory):
    path = tmp_path_factory.mktemp("stem") / "stem.pth"
    random_checkpoint(STEM_SPEC, path, seed=2)
    return build_sam(STEM_SPEC, path)


def test_stem_reaches_the_patch_grid_and_round_trips():
    stem = ConvStem((8, 16, 32, 64), embed_dim=64)
    assert stem(torch.zeros(2, 3, 256, 256)).shape == (2, 16, 16, 64)
    assert SamSpec.from_dict(yaml.safe_load(yaml.safe_dump(STEM_SPEC.to_dict()))) == STEM_SPEC
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(STEM_SPEC, stem_channels=(8, 16, 32))
    assert spec_by_name("sam_small").stem_channels == ()  # the shipped model keeps its patchify


def test_engine_matches_the_predictor_with_a_conv_stem(stem_sam):
    assert isinstance(stem_sam.image_encoder.patch_embed, ConvStem)
    height, width = 300, 410
    image = make_image(height, width, seed=7)
    predictor = SamPredictor(stem_sam)
    predictor.set_image(image)
    engine = SamEngine(stem_sam)
    embedding = engine.embed({"img": image})["img"]
    assert tuple(embedding.embedding.shape) == tuple(predictor.features.shape)
    point = np.array([[width * 0.3, height * 0.5]])
    box = np.array([width * 0.1, height * 0.2, width * 0.6, height * 0.9])
    masks, scores, logits = predictor.predict(
        point_coords=point, point_labels=np.array([1]), box=box, multimask_output=True
    )
    (prediction,) = engine.predict(embedding, [Prompt(point, np.array([1]), box, None)])
    np.testing.assert_allclose(prediction.scores, scores, atol=1e-4)
    assert (prediction.dense_masks() == masks).mean() >= 0.9999
    np.testing.assert_allclose(prediction.low_res_logits, logits, atol=1e-3)
