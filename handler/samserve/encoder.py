"""SAM's image encoder with its global attention computed a slice of the map at a time.

The official encoders attend globally in four blocks, over all 64x64 = 4096 image tokens:
each head's 4096x4096 map, far larger than any cache, goes to memory and back for its
scores, both relative-position adds and the softmax, and on a CPU those passes take most
of an encoder run. ``SlicedAttention`` runs the same ops on a few query rows of a few
heads at a time (at least two: ``head_groups``), so each slice of the map stays in cache:
the same bits as ``segment_anything``'s ``Attention`` (tested). Windowed blocks (14x14
windows) keep SAM's own forward.

On a GPU the encoder runs as ``EncoderOptions`` say, chosen once by the engine for its
device: ``SdpaAttention`` (PyTorch's fused ``scaled_dot_product_attention``, SAM's
relative positions as its additive mask) in every block, under ``torch.autocast`` in
bfloat16, and optionally compiled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor

from .matmul import bmm

ENCODER_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``encoder_dtype`` values: ``auto`` (bfloat16 on CUDA, float32 elsewhere) or the dtype
the image encoder's autocast computes in (float32: no autocast)."""

ENCODER_ATTENTIONS = ("auto", "sdpa", "sliced")
"""``encoder_attention`` values: ``auto`` (``sdpa`` on CUDA, ``sliced`` elsewhere),
``sdpa`` (``SdpaAttention``) or ``sliced`` (``SlicedAttention``, as ``build_sam`` makes it)."""

SDPA_MASK_ELEMENTS = 1 << 28
"""Additive-mask elements one ``scaled_dot_product_attention`` call holds: the mask of all
images of a batch at once would be heads x (HW)^2 per image; images go in turn past this."""

A = TypeVar("A", bound=Attention)


@dataclass(frozen=True)
class EncoderOptions:
    """How the engine runs the image encoder (the ``encoder_*`` and ``compile`` settings).

    Arguments:
      dtype (str): one of ``ENCODER_DTYPES``: the ``torch.autocast`` dtype around the image
        encoder only; its output is stored as float32 whatever the dtype.
      attention (str): one of ``ENCODER_ATTENTIONS``.
      compile (bool): ``torch.compile`` the image encoder, compiled by a warm-up encode
        when the engine is made (not by the first request).
    """

    dtype: str = "auto"
    attention: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ENCODER_DTYPES:
            raise ValueError(
                f"encoder_dtype must be one of {tuple(ENCODER_DTYPES)}, not {self.dtype!r}"
            )
        if self.attention not in ENCODER_ATTENTIONS:
            raise ValueError(
                f"encoder_attention must be one of {ENCODER_ATTENTIONS}, not {self.attention!r}"
            )
        if not isinstance(self.compile, bool):  # YAML's "false" is a string, and truthy
            raise ValueError(f"compile must be true or false, not {self.compile!r}")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the encoder computes in on ``device`` under autocast; None: float32,
        no autocast."""
        dtype = ENCODER_DTYPES[self.dtype]
        if self.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else None
        return None if dtype == torch.float32 else dtype

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the image encoder runs in on ``device``: autocast in
        ``autocast_dtype``, or nothing."""
        dtype = self.autocast_dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def uses_sdpa(self, device: torch.device) -> bool:
        """Whether the encoder's attention on ``device`` is ``SdpaAttention``."""
        return self.attention == "sdpa" or (self.attention == "auto" and device.type == "cuda")


def _same_parameters(cls: type[A], module: Attention) -> A:
    """A ``cls`` attention that holds ``module``'s own projections and relative position
    tables (the same modules and Parameter objects), in its training mode."""
    input_size = None
    if module.use_rel_pos:  # tables of 2S - 1 rows for a side of S tokens
        input_size = ((len(module.rel_pos_h) + 1) // 2, (len(module.rel_pos_w) + 1) // 2)
    # Built on the meta device: everything it holds is replaced at once, so nothing is
    # allocated or initialised.
    with torch.device("meta"):
        new = cls(
            module.qkv.in_features,
            module.num_heads,
            qkv_bias=module.qkv.bias is not None,
            use_rel_pos=module.use_rel_pos,
            input_size=input_size,
        )
    new.qkv, new.proj = module.qkv, module.proj
    if module.use_rel_pos:
        new.rel_pos_h, new.rel_pos_w = module.rel_pos_h, module.rel_pos_w
    return new.train(module.training)


SLICE_ELEMENTS = 1 << 20
"""Attention-map elements per slice (two query-token rows of two heads on a 64x64 grid):
small enough for a core's cache, large enough that each product stays efficient."""

SLICED_FROM_TOKENS = 1024
"""Attention over fewer tokens (SAM's 14x14 windows) runs as SAM runs it."""


class SlicedAttention(Attention):
    """``segment_anything``'s encoder ``Attention`` (same parameters), its map made a
    slice at a time when it is large and autograd is off."""

    @classmethod
    def from_attention(cls, module: Attention) -> SlicedAttention:
        """A ``SlicedAttention`` that holds ``module``'s own projections and relative
        position tables (the same modules and Parameter objects), in its training mode.

        Arguments:
          module (Attention): ``segment_anything``'s encoder attention to stand in for.

        Returns:
          (SlicedAttention): the same attention, its large maps made slice by slice.
        """
        return _same_parameters(cls, module)

    def forward(self, x: Tensor) -> Tensor:
        """BxHxWxC image tokens to BxHxWxC, as ``Attention.forward``."""
        batch, height, width, _ = x.shape
        if not self.use_rel_pos or height * width < SLICED_FROM_TOKENS or torch.is_grad_enabled():
            return super().forward(x)  # training keeps SAM's graph
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        # q, k, v: (B x heads) x HW x d, as SAM makes them
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * self.num_heads, height * width, -1)
        out = sliced_attention(self, q, k, v, (height, width))
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))


def sliced_attention(
    attn: Attention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: tuple[int, int],
    elements: int = SLICE_ELEMENTS,
) -> Tensor:
    """``softmax(q k^T scale + rel_h + rel_w) v`` with SAM's decomposed relative positions
    (``add_decomposed_rel_pos``), its ops on whole query rows of a few heads at a time.

    Arguments:
      attn (Attention): the attention whose scale (d ** -0.5) and relative-position
        tables ((2H - 1)xd and (2W - 1)xd) are used.
      q, k, v (Tensor): Gx(HW)xd queries, keys and values (G: heads times images).
      size (tuple(int, int)): (H, W) of the token grid.
      elements (int): about how many map entries one slice holds.

    Returns:
      (Tensor): Gx(HW)xd, as SAM's attention makes it before its output projection.
    """
    height, width = size
    groups, tokens, channels = q.shape
    # Both relative-position terms (Gx HxWxH and HxWxW, small beside the map) for all
    # queries at once, as SAM makes them: on slices the einsums' products would have
    # other shapes, and MKL rounds some of those differently.
    grid = q.reshape(groups, height, width, channels)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, get_rel_pos(height, height, attn.rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, get_rel_pos(width, width, attn.rel_pos_w))
    # Products take their right-hand operands whole (oneDNN: as plain matrices); q, k and
    # v are views into one qkv tensor, their rows 3C apart.
    keys_t, values = k.contiguous().transpose(1, 2), v.contiguous()
    per_row = width * tokens  # map entries of one head's row of query tokens
    heads = min(groups, max(2, elements // (height * per_row)))  # see head_groups
    rows = max(1, min(height, elements // (heads * per_row)))
    out = q.new_empty(q.shape)
    for group in head_groups(groups, heads):
        for top in range(0, height, rows):
            count = min(rows, height - top)
            span = slice(top * width, (top + count) * width)
            rows_of = slice(top, top + count)
            scores = bmm(q[group, span] * attn.scale, keys_t[group])
            scores = (
                scores.view(-1, count, width, height, width) + rel_h[group, rows_of, :, :, None]
            )
            scores = (scores + rel_w[group, rows_of, :, None, :]).view(-1, count * width, tokens)
            out[group, span] = bmm(scores.softmax(dim=-1), values[group])
    return out


def head_groups(groups: int, size: int) -> list[slice]:
    """``range(groups)`` in consecutive slices of ``size`` heads (the last one more where
    one head would be left alone): SAM multiplies all heads in one batched product, and
    MKL's product of a batch of one head can give other bits than the same rows in a
    batch of several (it does on a Xeon with AVX-512; batches of two and more agree)."""
    starts = list(range(0, groups, size))
    if len(starts) > 1 and groups - starts[-1] == 1:
        starts.pop()  # the last head joins the group before it
    return [slice(start, stop) for start, stop in zip(starts, [*starts[1:], groups])]


class SdpaAttention(Attention):
    """``segment_anything``'s encoder ``Attention`` (same parameters) through PyTorch's
    ``F.scaled_dot_product_attention``: its fused kernels on a GPU never write the map,
    with SAM's decomposed relative positions as the additive ``attn_mask``. Windowed and
    global blocks alike; within float rounding of SAM's (tested)."""

    @classmethod
    def from_attention(cls, module: Attention) -> SdpaAttention:
        """A ``SdpaAttention`` that holds ``module``'s own projections and relative
        position tables (the same modules and Parameter objects), in its training mode.

        Arguments:
          module (Attention): SAM's encoder attention, or a ``SlicedAttention``.

        Returns:
          (SdpaAttention): the same attention, through ``scaled_dot_product_attention``.
        """
        return _same_parameters(cls, module)

    def forward(self, x: Tensor) -> Tensor:
        """BxHxWxC image tokens to BxHxWxC, as ``Attention.forward``."""
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1)
        # q, k, v: B x heads x HW x d, SAM's (B x heads) x HW x d split by image
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Images in turn where the masks of all of them would be large (global blocks).
        step = max(1, SDPA_MASK_ELEMENTS // (self.num_heads * tokens * tokens))
        parts = []
        for start in range(0, batch, step):
            part = slice(start, start + step)
            mask = None
            if self.use_rel_pos:
                mask = relative_position_bias(self, q[part], (height, width))
            parts.append(
                F.scaled_dot_product_attention(
                    q[part], k[part], v[part], attn_mask=mask, scale=self.scale
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))


def relative_position_bias(attn: Attention, q: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM's decomposed relative-position terms (``add_decomposed_rel_pos``) as one
    additive attention mask.

    Arguments:
      attn (Attention): the attention whose relative-position tables ((2H - 1)xd and
        (2W - 1)xd) are used.
      q (Tensor): BxNx(HW)xd queries (N heads), unscaled, as SAM adds them.
      size (tuple(int, int)): (H, W) of the token grid.

    Returns:
      (Tensor): BxNx(HW)x(HW) ``rel_h + rel_w`` for each query and key token, in ``q``'s
        dtype (``scaled_dot_product_attention`` takes a mask of its queries' dtype).
    """
    height, width = size
    batch, heads, tokens, channels = q.shape
    grid = q.reshape(batch * heads, height, width, channels)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, get_rel_pos(height, height, attn.rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, get_rel_pos(width, width, attn.rel_pos_w))
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(batch, heads, tokens, tokens).to(q.dtype)


def use_sdpa(encoder: torch.nn.Module) -> int:
    """Make every attention block of ``encoder`` (SAM's ``Attention`` or
    ``SlicedAttention``) a ``SdpaAttention`` with the same parameters, in place.

    Returns:
      (int): how many blocks were replaced.
    """
    replaced = 0
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (Attention, SlicedAttention):
                setattr(parent, name, SdpaAttention.from_attention(child))
                replaced += 1
    return replaced
