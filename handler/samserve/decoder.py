"""SAM's mask decoder, computed for many prompts on one image embedding.

Same modules, same weights, same answer as ``MaskDecoder.predict_masks`` (to float
rounding), less work:

* The image side is shared. SAM repeats the 1xCxhxw embedding once per prompt before its
  transformer; here it stays one tensor until the first layer that makes it per-prompt,
  so the first block's image-side work runs once for all prompts.
* Cross attention between the few prompt tokens (T, about 7) and the many image tokens
  (N = h x w, 4096 for official SAM) never needs the image side projected. Every
  projection is linear, so it moves onto the token side: image-to-token attention scores
  are ``image @ (W_q^T k^T)`` and its output is ``softmax @ (v W_o^T)``; token-to-image
  scores are ``(q W_k) @ image^T`` and its output is ``(softmax @ image) W_v^T``. The
  NxC by Cx(C/2) projections (``q_proj``/``k_proj``/``v_proj``/``out_proj`` on the image)
  become NxC by Cx(heads x T) products, narrower for a prompt of a few points, and the
  per-head splits and merges of NxC tensors disappear.
* Except in the first block, where the image tokens are still the same for every prompt
  without a mask input: there SAM's own image-side projections are cheapest, and they
  depend on the image alone, so ``project_image`` makes them once per image and every
  later call only multiplies them by its tokens' (heads x d products, d = 16).
* The upscaling to low-res masks (two stride-2 transposed convolutions) acts on each image
  token alone, so it runs on rows of tokens in cache-sized chunks (``upscaled_masks``).

Attention residuals are added inside the matmul that makes them. Per-prompt image tokens
get the positional encoding added once per layer, as SAM does: the add is cheaper than
the product with the encoding that would replace it (docs/performance.md).

Shapes follow ``segment_anything.modeling.transformer``: C channels, N image tokens,
T prompt tokens, B prompts; image-side tensors are 1xNxC while shared, BxNxC after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor

from .matmul import bmm, linear


def predict_masks(
    decoder: MaskDecoder,
    embedding: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    select: Callable[[Tensor], Tensor] | None = None,
    projections: ImageProjections | None = None,
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` for B prompts on one image.

    Arguments:
      decoder (MaskDecoder): SAM's mask decoder, whose modules and weights are used.
      embedding (Tensor): the image's 1xCxhxw embedding.
      image_pe (Tensor): the 1xCxhxw positional encoding (``get_dense_pe``).
      sparse (Tensor): BxTxC prompt tokens (the prompt encoder's sparse embeddings).
      dense (Tensor): 1xCxhxw (no mask input: shared by every prompt) or BxCxhxw dense
        embeddings.
      select (callable or None): maps the Bx(1+M) IoU predictions to BxK indices of the
        mask tokens whose logits are wanted; the others' are never made (the IoU head
        runs before the upscaling). None: all 1+M.
      projections (ImageProjections or None): ``project_image`` of this same embedding,
        1xCxhxw ``dense`` and encoding; they spare the first block its image-side work.

    Returns:
      (Tensor): BxKx(4h)x(4w) low-res logits.
      (Tensor): their BxK IoU predictions (without ``select``, all 1+M mask tokens', as
        SAM returns them).
    """
    batch = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
    # Only the IoU and mask tokens' outputs are read: the prompt tokens skip the final attention.
    hs, src = two_way_transformer(
        decoder.transformer,
        embedding + dense,
        image_pe,
        tokens,
        projections,
        outputs=1 + decoder.num_mask_tokens,
    )
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    selected = None if select is None else select(iou)
    masks = upscaled_masks(
        decoder.output_upscaling,
        src.expand(batch, -1, -1),
        hyper_in,
        embedding.shape[-2:],
        UPSCALE_CHUNK if embedding.device.type == "cpu" else None,
        selected,
    )
    return masks, iou if selected is None else iou.gather(1, selected)


@dataclass(frozen=True)
class ImageProjections:
    """The first block's attention projections of one image's tokens, per head.

    ``keys_t`` (heads x d x N) and ``values`` (heads x N x d) are token-to-image keys
    (transposed) and values, ``queries_t`` (heads x d x N) image-to-token queries
    (transposed): SAM's ``k_proj``, ``v_proj`` and ``q_proj`` of the image tokens (with
    the positional encoding where SAM adds it). Together 3 x (heads x d) x N values, 1.5
    times the embedding's size (SAM's cross attentions have heads x d = C/2).
    """

    keys_t: Tensor
    values: Tensor
    queries_t: Tensor

    @property
    def nbytes(self) -> int:
        return sum(
            t.element_size() * t.nelement() for t in (self.keys_t, self.values, self.queries_t)
        )


def project_image(
    decoder: MaskDecoder, embedding: Tensor, image_pe: Tensor, dense: Tensor
) -> ImageProjections:
    """``ImageProjections`` of a 1xCxhxw ``embedding`` with the shared 1xCxhxw ``dense``
    ("no mask") embedding and ``image_pe``, for ``predict_masks``."""
    layer = decoder.transformer.layers[0]
    keys = (embedding + dense).flatten(2)[0].t()  # NxC
    keys_pe = keys + image_pe.flatten(2)[0].t()
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    count = keys.shape[0]
    return ImageProjections(
        keys_t=t2i.k_proj(keys_pe).view(count, t2i.num_heads, -1).permute(1, 2, 0).contiguous(),
        values=t2i.v_proj(keys).view(count, t2i.num_heads, -1).transpose(0, 1).contiguous(),
        queries_t=i2t.q_proj(keys_pe).view(count, i2t.num_heads, -1).permute(1, 2, 0).contiguous(),
    )


UPSCALE_CHUNK = 1024
"""Image tokens upscaled per step on a CPU: their sub-pixel features (4 x 1024 rows of
C/4 channels, then 16 x 1024 rows of C/8) stay in cache between the steps that use them,
where a whole 64x64 grid's spill to memory, so a prompt's upscaling costs the same
however many prompts a call holds. GPUs take all prompts in one step."""


def upscaled_masks(
    upscaling: torch.nn.Sequential,
    src: Tensor,
    hyper_in: Tensor,
    size: tuple[int, int],
    chunk: int | None = UPSCALE_CHUNK,
    selected: Tensor | None = None,
) -> Tensor:
    """SAM's ``output_upscaling`` then its hypernetwork product, token by token.

    Arguments:
      upscaling (torch.nn.Sequential): SAM's ``output_upscaling``.
      src (Tensor): BxNxC image tokens, N = h x w.
      hyper_in (Tensor): BxMx(C/8) mask-token weights.
      size (tuple(int, int)): (h, w) of the token grid.
      chunk (int or None): about how many image tokens of one prompt go per step, as
        whole rows of the grid (at least one); None: everything in one step.
      selected (Tensor or None): BxK indices into M of the masks to make; None: all M. A
        mask's logits are the same bits whichever others are kept.

    Returns:
      (Tensor): BxKx(4h)x(4w) low-res logits, ``hyper_in @ upscaling(src)`` (K = M
        without ``selected``).

    Both transposed convolutions have kernel 2 and stride 2, so the 4x4 pixels above an
    image token depend on that token alone: each convolution is a matmul on token rows
    (out channels x 2 x 2 columns), ``LayerNorm2d`` a layer norm over one sub-pixel's
    channels and GELU is pointwise. Computed so, never as a Bx(C/8)x4hx4w feature map,
    the transposes disappear and the work can go in cache-sized chunks.
    """
    batch, count, channels = src.shape
    height, width = size
    upscale_rows = _row_upscaler(upscaling)
    if chunk is None:
        features = upscale_rows(src.reshape(batch * count, channels))
        logits = hyper_in @ features.view(batch, count * 16, -1).transpose(1, 2)  # BxMx16N
        if selected is not None:
            logits = logits.gather(1, selected[:, :, None].expand(-1, -1, logits.shape[2]))
        out = logits.new_empty(batch, logits.shape[1], 4 * height, 4 * width)
        _copy_to_pixels(logits, width, out)
        return out
    # Every mask's product is taken, then the selected kept: the products' rounding then
    # never depends on which masks a request asked for.
    masks = hyper_in.shape[1] if selected is None else selected.shape[1]
    out = src.new_empty(batch, masks, 4 * height, 4 * width)
    rows = max(1, chunk // width)
    for b in range(batch):
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            logits = hyper_in[b] @ upscale_rows(src[b, top * width : bottom * width]).t()
            if selected is not None:
                logits = logits.index_select(0, selected[b])
            _copy_to_pixels(logits, width, out[b, :, 4 * top : 4 * bottom])
    return out


# Integer types as wide as two logits: see _copy_to_pixels.
_PAIR_INTEGERS = {2: torch.int32, 4: torch.int64}


def _copy_to_pixels(logits: Tensor, width: int, out: Tensor) -> None:
    """Write ...xKx(R x 16) logits of R image tokens (R a whole number of token rows of
    ``width``), columns ordered (token y, token x, dy1, dx1, dy2, dx2), into ``out``
    (...xKx(4R / width)x(4 width), each row contiguous) in pixel order: pixel
    (4y + 2dy1 + dy2, 4x + 2dx1 + dx2).

    The two logits of each (dy2, dx2 = 0, 1) pair are neighbours in both orders, so they
    move as one integer twice their width: the copy then moves half as many elements,
    and none alone (a strided copy of single floats runs element by element on a CPU).
    The same bits either way; autograd records the float copy.
    """
    pair = _PAIR_INTEGERS.get(logits.element_size())
    paired = pair is not None and logits.is_contiguous() and not torch.is_grad_enabled()
    if paired:
        logits, out = logits.view(pair), out.view(pair)
    *lead, count = logits.shape
    sub_pixels = (2, 2, 2) if paired else (2, 2, 2, 2)  # dy1, dx1, dy2 (, dx2)
    grid = logits.view(*lead, count // (2 ** len(sub_pixels) * width), width, *sub_pixels)
    at = len(lead)
    # (y, x, dy1, dx1, dy2, dx2) -> (y, dy1, dy2, x, dx1, dx2); dx2 stays last
    order = (at, at + 2, at + 4, at + 1, at + 3, at + 5)[: 2 + len(sub_pixels)]
    ordered = grid.permute(*range(at), *order)
    out.view(ordered.shape).copy_(ordered)


def _row_upscaler(upscaling: torch.nn.Sequential) -> Callable[[Tensor], Tensor]:
    """``output_upscaling`` as a map from R image tokens (RxC) to (Rx16)x(C/8) sub-pixel
    features, rows ordered (token, dy1, dx1, dy2, dx2); the convolutions' weights are laid
    out as matmul operands once, for every chunk."""
    conv1, norm, _, conv2, _ = upscaling
    mid, out = conv1.out_channels, conv2.out_channels
    # As F.linear weights (transposed views of Cx4C' operands).
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * mid).t()
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out).t()
    b1, b2 = conv1.bias.repeat(4), conv2.bias.repeat(4)

    # GELU in place (aten's gelu_; F.gelu has no such flag) on the fresh outputs of the
    # layer norm and matmul: the same bits, one fewer pass through memory where gradients
    # are not needed.
    gelu = F.gelu if torch.is_grad_enabled() else torch.ops.aten.gelu_

    def upscale_rows(rows: Tensor) -> Tensor:
        x = linear(rows, w1, b1).view(-1, mid)
        x = gelu(F.layer_norm(x, (mid,), norm.weight, norm.bias, norm.eps))
        return gelu(linear(x, w2, b2)).view(-1, out)

    return upscale_rows


def two_way_transformer(
    transformer: TwoWayTransformer,
    image: Tensor,
    image_pe: Tensor,
    tokens: Tensor,
    projections: ImageProjections | None = None,
    outputs: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward``: ``image`` 1xCxhxw or BxCxhxw, ``image_pe`` 1xCxhxw,
    ``tokens`` BxTxC; ``projections`` (of a 1xCxhxw ``image``) for the first block. Returns
    the BxTxC tokens (only the first ``outputs`` of them, when given: the final attention
    acts on each token alone) and the 1|BxNxC image tokens."""
    # Token-major copies: every later image-side op reads rows of C channels.
    keys = image.flatten(2).transpose(1, 2).contiguous()
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    queries = tokens
    for index, layer in enumerate(transformer.layers):
        if index == 0 and projections is not None:
            queries, keys = _projected_block(layer, queries, keys, tokens, projections)
        else:
            # After the first block, keys is a block's fresh norm output, no caller's tensor:
            # without autograd, the image-to-token residual may be added into it in place.
            writable = index > 0 and not torch.is_grad_enabled()
            queries, keys = _block(layer, queries, keys, tokens, key_pe, writable)
    queries, tokens = queries[:, :outputs], tokens[:, :outputs]
    attn_out = _tokens_to_image(
        transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys
    )
    return transformer.norm_final_attn(queries + attn_out), keys


def _block(
    layer: TwoWayAttentionBlock,
    queries: Tensor,
    keys: Tensor,
    query_pe: Tensor,
    key_pe: Tensor,
    overwrite_keys: bool = False,
) -> tuple[Tensor, Tensor]:
    """``TwoWayAttentionBlock.forward`` with both cross attentions done token-side;
    ``overwrite_keys``: the BxNxC ``keys`` may be reused for the block's image tokens."""
    queries = _self_attention(layer, queries, query_pe)
    k = keys + key_pe
    attn_out = _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = _image_to_tokens(
        layer.cross_attn_image_to_token, k, queries + query_pe, queries, keys, overwrite_keys
    )
    return queries, layer.norm4(keys)


def _projected_block(
    layer: TwoWayAttentionBlock,
    queries: Tensor,
    keys: Tensor,
    query_pe: Tensor,
    projections: ImageProjections,
) -> tuple[Tensor, Tensor]:
    """``TwoWayAttentionBlock.forward`` on 1xNxC image tokens ``keys`` whose projections are
    given: per head, Bx(T x d) token projections times d x N image ones."""
    queries = _self_attention(layer, queries, query_pe)
    attn = layer.cross_attn_token_to_image
    batch, count, _ = queries.shape
    query = _split_heads(attn.q_proj(queries + query_pe), attn.num_heads)  # heads x BT x d
    scale = 1.0 / math.sqrt(query.shape[-1])
    probs = torch.softmax(torch.bmm(query * scale, projections.keys_t), dim=-1)
    mixed = torch.bmm(probs, projections.values).view(attn.num_heads, batch, count, -1)
    attn_out = attn.out_proj(mixed.permute(1, 2, 0, 3).reshape(batch, count, -1))
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))

    attn = layer.cross_attn_image_to_token
    key = _split_heads(attn.k_proj(queries + query_pe), attn.num_heads)
    scale = 1.0 / math.sqrt(key.shape[-1])
    # Scores transposed, heads x BT x N, as in _image_to_tokens: softmax over T runs
    # along N-long rows.
    scores = torch.bmm(key * scale, projections.queries_t).view(attn.num_heads, batch, count, -1)
    probs = torch.softmax(scores, dim=2).transpose(0, 1).reshape(batch, -1, scores.shape[-1])
    keys = torch.baddbmm(keys, probs.transpose(1, 2), _values_to_output(attn, queries))
    return queries, layer.norm4(keys)


def _self_attention(layer: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor) -> Tensor:
    """A block's token self-attention and first norm (no residual in SAM's first block)."""
    if layer.skip_first_layer_pe:
        return layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
    q = queries + query_pe
    return layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))


def _split_heads(projected: Tensor, heads: int) -> Tensor:
    """BxTx(heads x d) projected tokens as heads x (B x T) x d."""
    batch, count, _ = projected.shape
    return (
        projected.view(batch, count, heads, -1)
        .permute(2, 0, 1, 3)
        .reshape(heads, batch * count, -1)
    )


def _heads(linear: torch.nn.Linear, heads: int) -> tuple[Tensor, Tensor]:
    """A projection's weight as heads x d x C and its bias as heads x d."""
    weight, bias = linear.weight, linear.bias
    return weight.view(heads, -1, weight.shape[1]), bias.view(heads, -1)


def _tokens_to_image(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``attn(q=q, k=k, v=v)`` for BxTxC tokens ``q`` and 1|BxNxC image tokens ``k``, ``v``.

    Scores ``(q W_q^T + b_q)_h (k W_k^T + b_k)_h^T`` are ``q'_h k^T`` with
    ``q'_h = (q W_q^T + b_q)_h W_k,h`` (the ``b_k`` term is the same for every image token,
    and softmax ignores it); the output ``softmax_h (v W_v^T + b_v)_h`` is
    ``(softmax_h v) W_v,h^T + b_v,h`` because softmax rows sum to one.
    """
    heads = attn.num_heads
    batch, count, _ = q.shape
    w_k, _ = _heads(attn.k_proj, heads)
    w_v, b_v = _heads(attn.v_proj, heads)
    query = attn.q_proj(q).view(batch, count, heads, -1)
    scale = 1.0 / math.sqrt(query.shape[-1])
    q_image = torch.einsum("bthd,hdc->bhtc", query, w_k).reshape(batch, heads * count, -1)
    probs = torch.softmax(_image_product(q_image * scale, k.transpose(1, 2)), dim=-1)
    mixed = _image_product(probs, v).view(batch, heads, count, -1)
    out = torch.einsum("bhtc,hdc->bthd", mixed, w_v) + b_v
    return attn.out_proj(out.reshape(batch, count, -1))


def _image_to_tokens(
    attn: Attention, q: Tensor, k: Tensor, v: Tensor, residual: Tensor, in_place: bool = False
) -> Tensor:
    """``residual + attn(q=q, k=k, v=v)`` for 1|BxNxC image tokens ``q`` and ``residual``
    and BxTxC tokens ``k``, ``v``; with ``in_place``, added into a BxNxC ``residual``
    (which saves copying it).

    Scores ``(q W_q^T + b_q)_h k'_h^T`` are ``q (W_q,h^T k'_h^T) + b_q,h k'_h^T`` with
    ``k' = k W_k^T + b_k``; the output ``softmax_h v'_h`` projected by ``W_o`` is
    ``softmax_h (v'_h W_o,h^T + b_o / heads)`` summed over heads (softmax rows sum to one).
    """
    heads = attn.num_heads
    batch, count, channels = k.shape
    w_q, b_q = _heads(attn.q_proj, heads)
    key = attn.k_proj(k).view(batch, count, heads, -1)
    scale = 1.0 / math.sqrt(key.shape[-1])
    from_image = torch.einsum("bthd,hdc->bhtc", key * scale, w_q).reshape(batch, -1, channels)
    offset = torch.einsum("bthd,hd->bht", key * scale, b_q).reshape(batch, -1, 1)
    to_out = _values_to_output(attn, v)

    # Scores transposed, Bx(heads x T)xN: softmax over T then runs along N-long rows
    # (over T-long rows, T about 7, it is slow: scalar code).
    scores = _image_product(from_image, q.transpose(1, 2)) + offset
    probs = torch.softmax(scores.view(batch, heads, count, -1), dim=2)
    if in_place:
        return residual.baddbmm_(probs.view(scores.shape).transpose(1, 2), to_out)
    return torch.baddbmm(residual, probs.view(scores.shape).transpose(1, 2), to_out)


def _values_to_output(attn: Attention, v: Tensor) -> Tensor:
    """Bx(heads x T)xC: each head's values of BxTxC tokens ``v`` through that head's part
    of the output projection, plus the output bias over heads (softmax rows sum to one, so
    attention-weighted sums of these rows over all heads are ``out_proj`` of the output)."""
    heads = attn.num_heads
    batch, count, channels = v.shape
    value = attn.v_proj(v).view(batch, count, heads, -1)
    w_o = attn.out_proj.weight.view(channels, heads, -1)
    to_out = torch.einsum("bthd,chd->bhtc", value, w_o) + attn.out_proj.bias / heads
    return to_out.reshape(batch, heads * count, channels)


def _image_product(left: Tensor, image: Tensor) -> Tensor:
    """BxKxN @ 1|BxNxM: with one shared image, a single large 2-D product for all B (one
    that takes a transposed ``image`` as it is, where a batched one may copy it)."""
    if image.shape[0] == 1:
        batch, rows, _ = left.shape
        return linear(left.reshape(batch * rows, -1), image[0].t()).view(batch, rows, -1)
    return bmm(left, image)
