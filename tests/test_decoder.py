"""samserve.decoder against segment_anything's own MaskDecoder, same weights."""

from __future__ import annotations

import pytest
import torch

from samserve import matmul
from samserve.decoder import predict_masks, project_image, upscaled_masks
from samserve.models import assemble_sam, spec_by_name

BACKENDS = ["torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])


@pytest.fixture(autouse=True, params=BACKENDS)
def cpu_matmul(request):
    """Every test on both CPU product backends (``samserve.matmul``): each must give SAM's
    answers, and the same bits where a test says so. The reference modules
    (``assemble_sam``, not ``build_sam``) multiply through torch's default either way."""
    assert matmul.set_backend(request.param) == request.param
    return request.param


@pytest.fixture(scope="module", params=["sam_micro", "sam_tiny"])
def sam(request):
    torch.manual_seed(0)
    model = assemble_sam(spec_by_name(request.param)).eval()
    with torch.no_grad():  # make every bias count: fresh modules start many of them at 0
        for name, param in model.mask_decoder.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def _prompts(sam, batch: int, mask_input: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    size = sam.image_encoder.img_size
    points = (
        torch.rand(batch, 2, 2, generator=generator) * size,
        torch.randint(0, 2, (batch, 2), generator=generator),
    )
    boxes = torch.tensor([[10.0, 20.0, size * 0.5, size * 0.7]]).expand(batch, -1)
    low = sam.prompt_encoder.mask_input_size
    masks = torch.randn(batch, 1, *low, generator=generator) if mask_input else None
    return sam.prompt_encoder(points=points, boxes=boxes, masks=masks)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mask_input", [False, True])
def test_same_logits_and_scores_as_segment_anything(sam, batch, mask_input):
    embed_dim, side = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, embed_dim, *side, generator=torch.Generator().manual_seed(1))
    image_pe = sam.prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(sam, batch, mask_input, seed=batch)
    with torch.inference_mode():
        expected_masks, expected_iou = sam.mask_decoder.predict_masks(
            embedding, image_pe, sparse, dense
        )
        shared = dense if mask_input else dense[:1]  # one "no mask" embedding for all
        masks, iou = predict_masks(sam.mask_decoder, embedding, image_pe, sparse, shared)
    assert masks.shape == expected_masks.shape == (batch, 4, side[0] * 4, side[1] * 4)
    torch.testing.assert_close(masks, expected_masks, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=2e-6, rtol=1e-5)


def test_gradients_match_segment_anything(sam):
    """Training runs through this decoder: its gradients must be SAM's too."""
    embed_dim, side = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, embed_dim, *side, generator=torch.Generator().manual_seed(2))
    image_pe = sam.prompt_encoder.get_dense_pe()
    grads = []
    for run in ("segment_anything", "samserve"):
        sam.zero_grad()
        sparse, dense = _prompts(sam, 2, False, seed=5)
        if run == "segment_anything":
            masks, iou = sam.mask_decoder.predict_masks(embedding, image_pe, sparse, dense)
        else:
            masks, iou = predict_masks(sam.mask_decoder, embedding, image_pe, sparse, dense[:1])
        (masks.square().mean() + iou.sum()).backward()
        # None: a weight the result does not depend on, such as the token-to-image
        # key bias (softmax cancels it): SAM's gradient for it is zero up to rounding
        grads.append(
            {
                n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in sam.mask_decoder.named_parameters()
            }
        )
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("chunk", [None, 7, 100, 4096])
def test_upscaled_masks_in_any_chunks_are_segment_anythings(sam, chunk):
    """Token-major upscaling (CPU: per-prompt chunks of whole token rows, a last shorter
    one and chunks under a row included; GPU: one step) equals SAM's
    ``hyper_in @ output_upscaling(src)``."""
    decoder = sam.mask_decoder
    side = sam.prompt_encoder.image_embedding_size
    generator = torch.Generator().manual_seed(3)
    src = torch.randn(2, side[0] * side[1], decoder.transformer_dim, generator=generator)
    hyper_in = torch.randn(2, 3, decoder.transformer_dim // 8, generator=generator)
    with torch.inference_mode():
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(2, -1, *side))
        expected = (hyper_in @ upscaled.flatten(2)).view(2, 3, *upscaled.shape[-2:])
        got = upscaled_masks(decoder.output_upscaling, src, hyper_in, side, chunk)
        selected = torch.tensor([[2, 0], [1, 1]])  # per prompt, any masks in any order
        kept = upscaled_masks(decoder.output_upscaling, src, hyper_in, side, chunk, selected)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # A mask's logits are the same bits whichever others are kept.
    assert torch.equal(kept, got[torch.arange(2)[:, None], selected])


def test_selected_mask_tokens_are_segment_anythings_same_tokens(sam):
    """``select`` picks mask tokens per prompt from the IoU predictions; only those are
    upscaled, and they equal SAM's logits and scores for the same tokens."""
    embed_dim, side = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, embed_dim, *side, generator=torch.Generator().manual_seed(3))
    image_pe = sam.prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(sam, 3, False, seed=7)
    with torch.inference_mode():
        expected_masks, expected_iou = sam.mask_decoder.predict_masks(
            embedding, image_pe, sparse, dense
        )
        seen = []

        def worst_then_best(iou):
            seen.append(iou.clone())
            return torch.stack([iou.argmin(dim=1), iou.argmax(dim=1)], dim=1)

        masks, iou = predict_masks(
            sam.mask_decoder, embedding, image_pe, sparse, dense[:1], worst_then_best
        )
    torch.testing.assert_close(seen[0], expected_iou, atol=2e-6, rtol=1e-5)
    selected = torch.stack([expected_iou.argmin(dim=1), expected_iou.argmax(dim=1)], dim=1)
    assert not torch.equal(selected[:, 0], selected[:, 1])
    assert masks.shape == (3, 2, side[0] * 4, side[1] * 4)
    rows = torch.arange(3)[:, None]
    torch.testing.assert_close(masks, expected_masks[rows, selected], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou[rows, selected], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_projected_image_gives_segment_anythings_logits(sam, batch):
    """``project_image`` once per image, then every call without a mask input: SAM's
    logits and scores, as without projections."""
    embed_dim, side = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, embed_dim, *side, generator=torch.Generator().manual_seed(4))
    image_pe = sam.prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(sam, batch, False, seed=11 + batch)
    with torch.inference_mode():
        expected_masks, expected_iou = sam.mask_decoder.predict_masks(
            embedding, image_pe, sparse, dense
        )
        projections = project_image(sam.mask_decoder, embedding, image_pe, dense[:1])
        masks, iou = predict_masks(
            sam.mask_decoder, embedding, image_pe, sparse, dense[:1], projections=projections
        )
    heads = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.num_heads
    tokens = side[0] * side[1]
    assert projections.keys_t.shape == (heads, embed_dim // 2 // heads, tokens)
    assert projections.values.shape == (heads, tokens, embed_dim // 2 // heads)
    torch.testing.assert_close(masks, expected_masks, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=2e-6, rtol=1e-5)


def test_logits_copied_to_pixel_order_in_pairs_are_the_same_bits():
    """The fast copy (two logits moved as one int64, without autograd) and the float copy
    autograd records put every logit at pixel (4y + 2dy1 + dy2, 4x + 2dx1 + dx2)."""
    from samserve.decoder import _copy_to_pixels

    rows, width = 3, 5
    logits = torch.randn(2, rows * width * 16, generator=torch.Generator().manual_seed(6))
    grid = logits.view(2, rows, width, 2, 2, 2, 2)  # y, x, dy1, dx1, dy2, dx2
    expected = torch.empty(2, 4 * rows, 4 * width)
    for y, x, dy1, dx1, dy2, dx2 in torch.cartesian_prod(
        *(torch.arange(n) for n in (rows, width, 2, 2, 2, 2))
    ).tolist():
        expected[:, 4 * y + 2 * dy1 + dy2, 4 * x + 2 * dx1 + dx2] = grid[
            :, y, x, dy1, dx1, dy2, dx2
        ]
    for grad in (False, True):
        out = torch.empty(2, 4 * rows, 4 * width)
        with torch.set_grad_enabled(grad):
            _copy_to_pixels(logits, width, out)
        assert torch.equal(out, expected)
