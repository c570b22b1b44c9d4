"""Specs and model building: official sizes through the registry, small ones from modules."""

from __future__ import annotations

import pytest
import torch
import yaml
from segment_anything.modeling.image_encoder import Attention

from samserve import matmul
from samserve.encoder import SlicedAttention
from samserve.models import (
    OFFICIAL_SPECS,
    SamSpec,
    assemble_sam,
    build_sam,
    random_checkpoint,
    spec_by_name,
    swap_modules,
)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "sam_tiny", "sam_micro"])
def test_spec_round_trips_through_yaml(name):
    spec = spec_by_name(name)
    assert SamSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec
    assert SamSpec.from_dict({"name": name}) == spec


def test_unknown_spec_and_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown SAM spec"):
        spec_by_name("vit_x")
    with pytest.raises(ValueError, match="unknown SamSpec fields"):
        SamSpec.from_dict({**spec_by_name("vit_b").to_dict(), "depth": 3})


def test_official_spec_is_the_registry_model(tmp_path):
    spec = OFFICIAL_SPECS["vit_b"]
    assert spec.is_official and spec.embedding_size == 64
    path = tmp_path / "sam_vit_b.pth"
    random_checkpoint(spec, path, seed=1)
    sam = build_sam(spec, path)
    saved = torch.load(path, weights_only=True)
    assert set(sam.state_dict()) == set(saved)
    for key in ("image_encoder.blocks.11.attn.qkv.weight", "mask_decoder.iou_token.weight"):
        assert torch.equal(sam.state_dict()[key], saved[key])
    assert sam.image_encoder.img_size == 1024 and not sam.training
    params = sum(p.numel() for p in sam.image_encoder.parameters())
    assert 85e6 < params < 90e6  # vit_b's image encoder


def test_custom_sizes_follow_the_spec(micro_sam):
    spec = spec_by_name("sam_micro")
    assert not spec.is_official
    assert micro_sam.image_encoder.img_size == 256
    assert micro_sam.prompt_encoder.image_embedding_size == (16, 16)
    with torch.inference_mode():
        features = micro_sam.image_encoder(torch.zeros(1, 3, 256, 256))
    assert features.shape == (1, 64, 16, 16)


def test_half_precision_checkpoint_loads_as_float(tmp_path, micro_sam):
    path = tmp_path / "half.pth"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in micro_sam.state_dict().items()},
        path,
    )
    sam = build_sam(spec_by_name("sam_micro"), path)
    weight = sam.mask_decoder.iou_token.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(
        weight, micro_sam.mask_decoder.iou_token.weight, atol=1e-3, rtol=1e-3
    )


def test_checkpoint_of_another_size_is_refused(tmp_path, checkpoints):
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_sam(spec_by_name("sam_tiny"), checkpoints["sam_micro"])


def test_built_model_swaps_its_layers_under_the_same_state_dict_keys(micro_sam):
    """build_sam's linear layers and encoder attention are samserve's, and a checkpoint
    of segment_anything's modules still fits key for key, in order."""
    types = {type(m) for m in micro_sam.modules()}
    assert matmul.Linear in types and SlicedAttention in types
    assert torch.nn.Linear not in types and Attention not in types
    assert list(micro_sam.state_dict()) == list(
        assemble_sam(spec_by_name("sam_micro")).state_dict()
    )
    assert not micro_sam.training and not any(m.training for m in micro_sam.modules())


def test_a_module_under_two_parents_is_swapped_once():
    shared = torch.nn.Linear(2, 2)
    root = torch.nn.Sequential(shared, torch.nn.Sequential(shared), torch.nn.ReLU())
    assert swap_modules(root, torch.nn.Linear, matmul.Linear.from_linear) == 1
    assert type(root[0]) is matmul.Linear and root[1][0] is root[0]
    assert root[0].weight is shared.weight
