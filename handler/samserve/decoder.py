"""SAM's mask decoder, computed for many prompts on one image embedding.

Same modules, same weights, same answer as ``MaskDecoder.predict_masks`` (to float
rounding), less work. Two facts make the difference:

* The image side is shared. SAM repeats the 1xCxhxw embedding once per prompt before its
  transformer; here it stays one tensor until the first layer that makes it per-prompt,
  so the first block's image-side work runs once for all prompts.
* Cross attention between the few prompt tokens (T, about 7) and the many image tokens
  (N = h x w, 4096 for official SAM) never needs the image side projected. Every
  projection is linear, so it moves onto the token side: image-to-token attention scores
  are ``image @ (W_q^T k^T)`` and its output is ``softmax @ (v W_o^T)``; token-to-image
  scores are ``(q W_k) @ image^T`` and its output is ``(softmax @ image) W_v^T``. The
  NxC by Cx(C/2) projections (``q_proj``/``k_proj``/``v_proj``/``out_proj`` on the image,
  about 0.27 GFLOP each per prompt on official SAM) become NxC by Cx(heads x T) products,
  about 4x cheaper, and the per-head splits and merges of NxC tensors disappear.

Shapes follow ``segment_anything.modeling.transformer``: C channels, N image tokens,
T prompt tokens, B prompts; image-side tensors are 1xNxC while shared, BxNxC after.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor

PredictMasks = Callable[[MaskDecoder, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def predict_masks(
    decoder: MaskDecoder, embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` for B prompts on one image.

    ``embedding`` and ``image_pe`` are 1xCxhxw; ``sparse`` is BxTxC prompt tokens;
    ``dense`` is 1xCxhxw (no mask input: shared) or BxCxhxw. Returns all mask tokens'
    Bx(1+M)xh'xw' low-res logits (h' = 4h) and Bx(1+M) IoU predictions.
    """
    batch = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
    _, channels, height, width = embedding.shape
    hs, src = two_way_transformer(decoder.transformer, embedding + dense, image_pe, tokens)
    src = src.expand(batch, -1, -1).transpose(1, 2).reshape(batch, channels, height, width)
    upscaled = decoder.output_upscaling(src)
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(hs[:, 0, :])


def two_way_transformer(
    transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor, tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward``: ``image`` 1xCxhxw or BxCxhxw, ``image_pe`` 1xCxhxw,
    ``tokens`` BxTxC. Returns the BxTxC tokens and the 1|BxNxC image tokens."""
    keys = image.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    attn_out = _tokens_to_image(
        transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys
    )
    return transformer.norm_final_attn(queries + attn_out), keys


def _block(
    layer: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
) -> tuple[Tensor, Tensor]:
    """``TwoWayAttentionBlock.forward`` with both cross attentions done token-side."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    k = keys + key_pe
    attn_out = _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn_out = _image_to_tokens(layer.cross_attn_image_to_token, k, queries + query_pe, queries)
    return queries, layer.norm4(keys + attn_out)


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
    probs = torch.softmax(_times_image(q_image * scale, k.transpose(1, 2)), dim=-1)
    mixed = _times_image(probs, v).view(batch, heads, count, -1)
    out = torch.einsum("bhtc,hdc->bthd", mixed, w_v) + b_v
    return attn.out_proj(out.reshape(batch, count, -1))


def _image_to_tokens(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``attn(q=q, k=k, v=v)`` for 1|BxNxC image tokens ``q`` and BxTxC tokens ``k``, ``v``.

    Scores ``(q W_q^T + b_q)_h k'_h^T`` are ``q (W_q,h^T k'_h^T) + b_q,h k'_h^T`` with
    ``k' = k W_k^T + b_k``; the output ``softmax_h v'_h`` projected by ``W_o`` is
    ``softmax_h (v'_h W_o,h^T)`` summed over heads, plus ``b_o``.
    """
    heads = attn.num_heads
    batch, count, channels = k.shape
    w_q, b_q = _heads(attn.q_proj, heads)
    key = attn.k_proj(k).view(batch, count, heads, -1)
    scale = 1.0 / math.sqrt(key.shape[-1])
    to_scores = torch.einsum("bthd,hdc->bcht", key * scale, w_q).reshape(batch, channels, -1)
    offset = torch.einsum("bthd,hd->bht", key * scale, b_q).reshape(batch, 1, -1)
    value = attn.v_proj(v).view(batch, count, heads, -1)
    w_o = attn.out_proj.weight.view(channels, heads, -1)
    to_out = torch.einsum("bthd,chd->bhtc", value, w_o).reshape(batch, heads * count, channels)

    scores = _image_times(q, to_scores) + offset
    probs = torch.softmax(scores.view(*scores.shape[:2], heads, count), dim=-1)
    return torch.baddbmm(attn.out_proj.bias, probs.view(scores.shape), to_out)


def _times_image(left: Tensor, image: Tensor) -> Tensor:
    """BxKxN @ 1|BxNxM: with one shared image, a single large matmul for all B."""
    if image.shape[0] == 1 and left.shape[0] > 1:
        batch, rows, _ = left.shape
        return (left.reshape(batch * rows, -1) @ image[0]).view(batch, rows, -1)
    return left @ image


def _image_times(image: Tensor, right: Tensor) -> Tensor:
    """1|BxNxC @ BxCxK: with one shared image, a single large matmul for all B."""
    if image.shape[0] == 1 and right.shape[0] > 1:
        batch, channels, cols = right.shape
        flat = right.permute(1, 0, 2).reshape(channels, batch * cols)
        return (image[0] @ flat).view(-1, batch, cols).transpose(0, 1)
    return image @ right
