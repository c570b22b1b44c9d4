"""samserve.encoder: SAM's encoder attention, sliced, gives segment_anything's bits."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from samserve import encoder, matmul
from samserve.encoder import (
    EncoderOptions,
    SdpaAttention,
    SlicedAttention,
    head_groups,
    sliced_attention,
    use_sdpa,
)
from samserve.models import assemble_sam, build_sam, spec_by_name, swap_modules

BACKENDS = ["torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])


def _attention(size: tuple[int, int], dim: int = 64, heads: int = 4) -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim, heads, use_rel_pos=True, input_size=size).eval()
    with torch.no_grad():  # SAM starts them at zero; trained ones are not
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elements", [1, 3 * 40 * 48, 10**9])  # a row, some rows, all
def test_sliced_attention_is_sams(backend, elements):
    matmul.set_backend(backend)
    attn = _attention((40, 48))
    x = torch.randn(2, 40, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = attn(x)
        b, h, w, _ = x.shape
        qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
        out = sliced_attention(attn, q, k, v, (h, w), elements)
        out = out.view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        got = attn.proj(out)
    if backend == "torch":
        assert torch.equal(got, expected)  # SAM's ops on slices of its rows: the same bits
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups, size", [(12, 2), (5, 2), (7, 3), (2, 2), (1, 1), (9, 12)])
def test_head_groups_cover_every_head_and_never_one_alone(groups, size):
    slices = head_groups(groups, size)
    heads = [h for part in slices for h in range(groups)[part]]
    assert heads == list(range(groups))
    lengths = [part.stop - part.start for part in slices]
    assert all(length >= min(2, groups) for length in lengths)
    assert all(length == min(size, groups) for length in lengths[:-1])


def test_small_maps_keep_sams_forward():
    attn = _attention((14, 14))
    x = torch.randn(3, 14, 14, 64)
    with torch.inference_mode():
        assert torch.equal(SlicedAttention.from_attention(attn)(x), attn(x))


@pytest.mark.parametrize("name", ["sam_tiny", "sam_small"])
def test_built_encoder_gives_segment_anythings_bits(name):
    """build_sam slices the global attention (64x64 and 32x32 tokens for these specs)."""
    matmul.set_backend("torch")
    torch.manual_seed(0)
    reference = assemble_sam(spec_by_name(name)).eval()
    with torch.no_grad():
        for block in reference.image_encoder.blocks:
            if block.attn.use_rel_pos:
                block.attn.rel_pos_h.normal_(0, 0.5)
                block.attn.rel_pos_w.normal_(0, 0.5)
    state = reference.state_dict()
    built = build_sam(spec_by_name(name))
    built.load_state_dict(state)
    assert any(type(m) is SlicedAttention for m in built.image_encoder.modules())
    size = reference.image_encoder.img_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(built.image_encoder(x), reference.image_encoder(x))


def test_attention_swapped_holds_the_same_parameters():
    sam = assemble_sam(spec_by_name("sam_micro"))
    keys = list(sam.state_dict())
    before = {name: m for name, m in sam.named_modules() if type(m) is Attention}
    assert swap_modules(sam, Attention, SlicedAttention.from_attention) == len(before) > 0
    assert swap_modules(sam, Attention, SlicedAttention.from_attention) == 0
    assert list(sam.state_dict()) == keys
    after = dict(sam.named_modules())
    for name, old in before.items():
        new = after[name]
        assert type(new) is SlicedAttention and new.training == old.training
        for attribute in ("num_heads", "scale", "use_rel_pos"):
            assert getattr(new, attribute) == getattr(old, attribute)
        assert new.qkv is old.qkv and new.proj is old.proj
        assert new.rel_pos_h is old.rel_pos_h and new.rel_pos_w is old.rel_pos_w
    assert not any(p.is_meta for p in sam.parameters())


def test_attention_without_relative_positions_swaps_too():
    attn = Attention(32, 4, qkv_bias=False).eval()
    sliced = SlicedAttention.from_attention(attn)
    assert not sliced.use_rel_pos and sliced.qkv is attn.qkv
    x = torch.randn(1, 40, 48, 32)
    with torch.inference_mode():
        assert torch.equal(sliced(x), attn(x))


def test_with_autograd_it_is_sams_forward_and_gradients():
    """Training builds its models with build_sam too: gradients must be SAM's."""
    attn = _attention((40, 48))
    x = torch.randn(1, 40, 48, 64, requires_grad=True)
    grads = []
    for module in (attn, SlicedAttention.from_attention(attn)):
        x.grad = None
        module(x).square().sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


# SAM's 14x14 windows (a batch of them), and global grids: 32x32 and a 40x48 rectangle.
SDPA_SHAPES = [(25, 14, 14), (2, 32, 32), (2, 40, 48)]


@pytest.mark.parametrize("batch, height, width", SDPA_SHAPES)
@pytest.mark.parametrize("mask_elements", [1, encoder.SDPA_MASK_ELEMENTS])  # image by image
def test_sdpa_attention_is_sams(monkeypatch, batch, height, width, mask_elements):
    monkeypatch.setattr(encoder, "SDPA_MASK_ELEMENTS", mask_elements)
    attn = _attention((height, width))
    x = torch.randn(batch, height, width, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = SdpaAttention.from_attention(attn)(x)
        torch.testing.assert_close(got, attn(x), atol=1e-5, rtol=1e-5)


def test_sdpa_attention_without_relative_positions_is_sams():
    attn = Attention(32, 4, qkv_bias=False).eval()
    x = torch.randn(2, 14, 14, 32)
    with torch.inference_mode():
        torch.testing.assert_close(SdpaAttention.from_attention(attn)(x), attn(x))


def test_use_sdpa_swaps_every_block_keeping_parameters():
    sam = build_sam(spec_by_name("sam_micro"))
    keys = list(sam.state_dict())
    before = {n: m for n, m in sam.image_encoder.named_modules() if isinstance(m, Attention)}
    assert use_sdpa(sam.image_encoder) == len(before) == len(sam.image_encoder.blocks)
    assert use_sdpa(sam.image_encoder) == 0  # already swapped
    assert list(sam.state_dict()) == keys
    after = dict(sam.image_encoder.named_modules())
    for name, old in before.items():
        assert type(after[name]) is SdpaAttention
        assert after[name].qkv is old.qkv and after[name].rel_pos_h is old.rel_pos_h


def test_sdpa_encoder_is_within_rounding_of_sams():
    """Windowed and global blocks of a full-size (1024, 64x64 tokens) encoder."""
    matmul.set_backend("torch")
    torch.manual_seed(0)
    reference = assemble_sam(spec_by_name("sam_tiny")).eval()
    with torch.no_grad():
        for block in reference.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    built = build_sam(spec_by_name("sam_tiny"))
    built.load_state_dict(reference.state_dict())
    use_sdpa(built.image_encoder)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = reference.image_encoder(x)
        torch.testing.assert_close(built.image_encoder(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "options, device, dtype, sdpa",
    [
        (EncoderOptions(), "cpu", None, False),
        (EncoderOptions(), "cuda", torch.bfloat16, True),
        (EncoderOptions("float32"), "cuda", None, True),
        (EncoderOptions("float16", "sliced"), "cuda", torch.float16, False),
        (EncoderOptions("bfloat16", "sdpa"), "cpu", torch.bfloat16, True),
    ],
)
def test_encoder_options_resolve_by_device(options, device, dtype, sdpa):
    assert options.autocast_dtype(torch.device(device)) == dtype
    assert options.uses_sdpa(torch.device(device)) == sdpa


@pytest.mark.parametrize(
    "kwargs",
    [dict(dtype="fp16"), dict(dtype="half"), dict(attention="flash"), dict(compile="false")],
)
def test_encoder_options_refuse_unknown_values(kwargs):
    with pytest.raises(ValueError):
        EncoderOptions(**kwargs)
