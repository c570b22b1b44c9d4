"""The image encoder's GPU settings: SDPA attention, autocast precision, torch.compile.

What a CPU can check runs here (autocast supports bfloat16 on a CPU, and SDPA runs on a
CPU too); the CUDA tests skip without a GPU and run in ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

import gpu_bench
from samserve.encoder import EncoderOptions, SdpaAttention, SlicedAttention
from samserve.engine import CPU_CALL_SIZES, MaskOptions, SamEngine
from samserve.models import assemble_sam, build_sam, spec_by_name
from samserve.settings import Settings
from training.evaluate import heldout
from training.prompts import random_pixel

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "sam_small_shapes.pth"
IMAGES = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _shipped(device: str = "cpu") -> torch.nn.Module:
    """A fresh copy of the shipped model (engines may swap its attention in place)."""
    return build_sam(spec_by_name("sam_small"), SHIPPED).to(device)


def mask_agreement(engine: SamEngine, reference: SamEngine, count: int = IMAGES) -> float:
    """The fraction of full-size mask pixels (all three masks of a click and a box on
    every instance of ``count`` held-out images) on which two engines agree."""
    samples = [(sample.image, sample.masks) for sample in heldout(count)]
    return gpu_bench.mask_agreement(engine, reference, samples).agreement


@pytest.mark.parametrize(
    "field, value",
    [
        ("encoder_dtype", "fp16"),
        ("encoder_dtype", "float64"),
        ("encoder_attention", "flash"),
        ("compile", "false"),
        ("compile", 1),
    ],
)
def test_settings_refuse_bad_encoder_values(field, value):
    with pytest.raises(ValueError):
        Settings.from_dict({field: value})


def test_settings_take_encoder_values():
    settings = Settings.from_dict(
        {"encoder_dtype": "bfloat16", "encoder_attention": "sdpa", "compile": True}
    )
    assert (settings.encoder_dtype, settings.encoder_attention, settings.compile) == (
        "bfloat16",
        "sdpa",
        True,
    )


def test_cpu_engine_keeps_sliced_attention_and_float32():
    engine = SamEngine(_shipped())
    assert engine.encoder_options.autocast_dtype(engine.device) is None
    kinds = {type(b.attn) for b in engine.model.image_encoder.blocks}
    assert kinds == {SlicedAttention}


def test_bfloat16_sdpa_encoder_agrees_with_float32_on_cpu():
    """The CUDA default (bf16 autocast, SDPA), run on a CPU: the embedding is kept as
    float32 and the masks agree with the float32 encoder's on almost every pixel."""
    engine = SamEngine(_shipped(), encoder=EncoderOptions("bfloat16", "sdpa"))
    assert {type(b.attn) for b in engine.model.image_encoder.blocks} == {SdpaAttention}
    reference = SamEngine(_shipped())
    image = heldout(1)[0].image
    embedding = engine.embed({"a": image})["a"]
    assert embedding.embedding.dtype == torch.float32
    agreement = mask_agreement(engine, reference)
    print(f"bf16 vs float32 encoder on CPU: masks agree on {agreement:.5f} of pixels")
    assert agreement >= 0.99


def test_float32_sdpa_engine_matches_float32_sliced_engine():
    engine = SamEngine(_shipped(), encoder=EncoderOptions("float32", "sdpa"))
    assert mask_agreement(engine, SamEngine(_shipped()), count=2) >= 0.9999


@cuda
def test_cuda_float32_masks_match_predictor_on_the_same_device():
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = spec_by_name("sam_small")
    reference = assemble_sam(spec)  # segment_anything's own modules
    reference.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True))
    predictor = SamPredictor(reference.eval().to("cuda"))
    engine = SamEngine(_shipped("cuda"), encoder=EncoderOptions("float32"))
    assert isinstance(engine.model.image_encoder.blocks[0].attn, SdpaAttention)
    rng = np.random.default_rng(0)
    for index, sample in enumerate(heldout(IMAGES)):
        predictor.set_image(sample.image)
        embedding = engine.embed({str(index): sample.image})[str(index)]
        torch.testing.assert_close(embedding.embedding, predictor.features, atol=1e-3, rtol=1e-3)
        prompts = gpu_bench.object_prompts(sample.masks, rng)
        for prompt, got in zip(prompts, engine.predict(embedding, prompts, MaskOptions())):
            masks, scores, _ = predictor.predict(
                prompt.point_coords, prompt.point_labels, prompt.box
            )
            np.testing.assert_allclose(got.scores, scores, atol=1e-3)
            assert (got.dense_masks() == masks).mean() >= 0.999


@cuda
def test_cuda_bfloat16_agrees_with_float32_and_caches_on_the_device():
    engine = SamEngine(_shipped("cuda"))  # auto: bfloat16, SDPA
    assert engine.encoder_options.autocast_dtype(engine.device) == torch.bfloat16
    embedding = engine.embed({"a": heldout(1)[0].image})["a"]
    cached = engine.cached_embedding("a")
    assert cached is embedding and cached.embedding.device.type == "cuda"
    assert cached.embedding.dtype == torch.float32
    reference = SamEngine(_shipped("cuda"), encoder=EncoderOptions("float32"))
    agreement = mask_agreement(engine, reference)
    print(f"bf16 vs float32 encoder on CUDA: masks agree on {agreement:.5f} of pixels")
    assert agreement >= 0.99


@cuda
def test_cuda_compiled_encoder_agrees_with_eager():
    engine = SamEngine(_shipped("cuda"), encoder_batch_size=2, encoder=EncoderOptions(compile=True))
    runs = engine.encoder_runs
    assert mask_agreement(engine, SamEngine(_shipped("cuda")), count=2) >= 0.99
    assert engine.encoder_runs - runs == 2  # the warm-up is not counted as images


@cuda
@pytest.mark.parametrize("batch, height, width", [(25, 14, 14), (2, 64, 64)])
def test_cuda_sdpa_attention_is_sams(batch, height, width):
    """SAM's windowed and global blocks on CUDA: float32 within rounding of SAM's own
    Attention, bfloat16 autocast close to it."""
    from segment_anything.modeling.image_encoder import Attention

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    attn = Attention(256, 8, use_rel_pos=True, input_size=(height, width)).eval().cuda()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(batch, height, width, 256, device="cuda")
    sdpa = SdpaAttention.from_attention(attn)
    with torch.inference_mode():
        expected = attn(x)
        torch.testing.assert_close(sdpa(x), expected, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = sdpa(x).float()
        assert (low - expected).abs().mean() < 0.05 * expected.abs().mean()


def _everything(device: str) -> tuple[int, int]:
    """Segment everything on one held-out image with the shipped model on ``device``, 64
    points in one generator batch: (masks found, decoder calls made)."""
    from samserve.everything import EverythingLimits, EverythingParams, segment_everything

    sample = heldout(1)[0]
    engine = SamEngine(_shipped(device))
    calls = []
    real = engine.predict_torch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    engine.predict_torch = counted
    embedding = engine.embed({"img": sample.image})["img"]
    params = EverythingParams(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.5)
    limits = EverythingLimits(4096, 4, 10**10, 60.0)
    result = segment_everything(engine, embedding, params, sample.image, limits)
    return len(result.records), len(calls)


def test_cpu_segment_everything_decodes_decoder_batch_size_points_per_call():
    """On a CPU the generator's 64 points go through the decoder a few at a time."""
    assert _everything("cpu")[1] == 64 // CPU_CALL_SIZES.decoder


@cuda
def test_cuda_segment_everything_decodes_a_generators_batch_in_one_call():
    """On a GPU the generator's points_per_batch go through the decoder in one call, and
    find what the CPU finds."""
    on_cpu, on_cuda = _everything("cpu"), _everything("cuda")
    assert on_cuda[1] == 1
    assert abs(on_cuda[0] - on_cpu[0]) <= 1


@cuda
def test_cuda_service_decodes_a_batchs_prompts_on_one_image_together():
    """On CUDA the service sizes decoder calls for the GPU and sends the prompts of a
    batch's requests on one image through one ``SamEngine.predict`` list."""
    import base64

    from conftest import png_bytes
    from samserve.service import SegmentService

    service = SegmentService.for_model(_shipped("cuda"), Settings())
    assert service.merge_decoder_calls and service.engine.decoder_batch_size == 64
    calls = []
    real = service.engine.predict

    def counted(embedding, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(embedding, prompts, *args, **kwargs)

    service.engine.predict = counted
    sample = heldout(1)[0]
    image = base64.b64encode(png_bytes(sample.image)).decode()
    rng = np.random.default_rng(0)
    clicks = [random_pixel(sample.masks[k % len(sample.masks)], rng) for k in range(3)]
    requests = [
        ({"image": image, "prompts": [{"points": [click], "labels": [1]}]}, "application/json")
        for click in clicks
    ]
    replies = service.handle(requests)
    assert [r.status for r in replies] == [200] * len(requests)
    assert calls == [len(requests)]
    assert all(len(r.body["results"]) == 1 for r in replies)
