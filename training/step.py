"""One training step of a small SAM: prompts from instance labels, decoder rounds, losses.

The step embeds a batch of images once (the costly part) and decodes many prompts per
image against those embeddings: each image gets ``prompts_per_image`` prompts of one kind
(a single foreground point, with three masks and the loss of the best one; a jittered box;
or both), then a refinement round that adds a click in the first answer's error region and
feeds its low-res logits back as ``mask_input``. Losses are computed on the low-res logits'
grid, against each instance's mask area-pooled to that grid: focal + dice per mask, plus
the MSE between the predicted and the actual IoU. SAM weighs focal 20:1; with objects
covering a few percent of the image that held the model in the all-background plateau far
longer (docs/model_card.md), so the default is 1:1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from torch import Tensor

from samserve.decoder import two_way_transformer, upscaled_masks

from .augment import Batch
from .prompts import choose_instances, error_clicks, jitter_boxes, mask_boxes, random_points
from .stopwatch import OFF, Stopwatch

PROMPT_KINDS = ("point", "box", "point_box")


@dataclass(frozen=True)
class StepConfig:
    """What a step asks of the model.

    prompts_per_image: prompts (of one kind) per image and round. min_pixels: the smallest
    instance (pixels in the input frame) that gets prompts. focal_weight, focal_alpha: the
    focal term's weight beside dice, and its foreground weight (< 0: none). iou_weight: the
    weight of the IoU head's MSE. refine: whether the refinement round runs.
    """

    prompts_per_image: int = 8
    min_pixels: int = 16
    focal_weight: float = 1.0
    focal_alpha: float = 0.25
    iou_weight: float = 1.0
    refine: bool = True


@dataclass
class Prompts:
    """One image's prompts in the model's input frame, for K instances.

    kind: one of ``PROMPT_KINDS``. targets: Kxhxw float32 area-pooled masks on the low-res
    grid. points: Kx1x2 (x, y) foreground points (drawn for every kind; used by ``point``
    and ``point_box``). boxes: Kx4 XYXY jittered boxes, or None for ``point``.
    """

    kind: str
    targets: Tensor
    points: Tensor
    boxes: Tensor | None


Decode = Callable[[MaskDecoder, Tensor, Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor]]
"""``decode_masks``' signature (the function, or a compiled copy of it)."""


def decode_masks(
    decoder: MaskDecoder,
    image: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    multimask: bool,
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.forward`` for B prompts, through the engine's own decoder functions
    (``samserve.decoder``) without the serving path's cache-sized chunks, which only add
    autograd nodes when training.

    Arguments:
      decoder (MaskDecoder): the model's mask decoder.
      image (Tensor): 1xCxhxw image embedding.
      image_pe (Tensor): 1xCxhxw dense positional encoding.
      sparse (Tensor): BxTxC prompt tokens.
      dense (Tensor): 1xCxhxw ("no mask") or BxCxhxw mask-input embeddings.
      multimask (bool): the three multimask outputs, else the single-mask one.
    Returns:
      (tuple): BxKx4hx4w low-res logits and their BxK predicted IoUs (K = 3 or 1).
    """
    batch, outputs = sparse.shape[0], 1 + decoder.num_mask_tokens
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
    hs, src = two_way_transformer(
        decoder.transformer, image + dense, image_pe, tokens, outputs=outputs
    )
    mask_tokens = hs[:, 1:outputs]
    hyper_in = torch.stack(
        [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    iou = decoder.iou_prediction_head(hs[:, 0])
    masks = upscaled_masks(
        decoder.output_upscaling, src.expand(batch, -1, -1), hyper_in, image.shape[-2:], None
    )
    keep = slice(1, None) if multimask else slice(0, 1)
    return masks[:, keep], iou[:, keep]


def mask_losses(
    logits: Tensor, target: Tensor, focal_weight: float, focal_alpha: float = 0.25
) -> tuple[Tensor, Tensor]:
    """Per-mask loss and actual IoU, in float32 whatever the logits' type.

    Arguments:
      logits (Tensor): KxCxhxw mask logits (C masks per prompt).
      target (Tensor): Kxhxw float targets in [0, 1] on the same grid.
      focal_weight (float): the focal term's weight beside dice.
      focal_alpha (float): the focal term's foreground weight; < 0 for none.
    Returns:
      (tuple): KxC losses (focal x weight + dice) and KxC IoUs of logits > 0 vs target > 0.5.
    """
    logits = logits.float()
    target = target[:, None].expand_as(logits)
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = bce * (1 - p_t) ** 2
    if focal_alpha >= 0:
        focal = focal * (focal_alpha * target + (1 - focal_alpha) * (1 - target))
    focal = focal.mean(dim=(-2, -1))
    inter = (prob * target).sum(dim=(-2, -1))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) + 1)
    with torch.no_grad():
        pred = logits > 0
        hard = target > 0.5
        union = (pred | hard).sum(dim=(-2, -1)).float()
        iou = torch.where(union > 0, (pred & hard).sum(dim=(-2, -1)) / union.clamp(min=1), 1.0)
    return focal_weight * focal + dice, iou


def sample_prompts(
    labels: Tensor, size: tuple[int, int], low: int, config: StepConfig, g: torch.Generator
) -> Prompts | None:
    """One image's prompts, all drawn at once from its label map.

    Arguments:
      labels (Tensor): SxS uint8 instance labels of the padded input frame.
      size (tuple[int, int]): the unpadded (h, w) (boxes are clipped to it).
      low (int): the low-res logits' side (S / 4).
      config (StepConfig): prompts per image and the smallest instance.
      g (torch.Generator): the step's generator.
    Returns:
      (Prompts | None): None when no instance is large enough.
    """
    chosen = choose_instances(labels, config.prompts_per_image, config.min_pixels, g)
    if chosen is None:
        return None
    masks = labels[None] == chosen[:, None, None].to(labels.dtype)
    targets = F.avg_pool2d(masks[:, None].float(), labels.shape[-1] // low)[:, 0]
    kind = PROMPT_KINDS[int(torch.randint(len(PROMPT_KINDS), (), generator=g))]
    points = random_points(masks, g)[:, None]
    boxes = None if kind == "point" else jitter_boxes(mask_boxes(masks), size, g)
    return Prompts(kind, targets, points, boxes)


def image_loss(
    sam: Sam,
    decode: Decode,
    embedding: Tensor,
    prompts: Prompts,
    config: StepConfig,
    g: torch.Generator,
    watch: Stopwatch = OFF,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one image's prompts: the first round and the refinement round.

    Arguments:
      sam (Sam): the model (its prompt encoder and mask decoder).
      decode (Decode): ``decode_masks`` or a compiled copy.
      embedding (Tensor): the image's 1xCxhxw embedding.
      prompts (Prompts): the image's prompts.
      config (StepConfig): loss weights and whether to refine.
      g (torch.Generator): the step's generator (draws the corrective clicks).
      watch (Stopwatch): times the phases.
    Returns:
      (tuple): the scalar loss and the rounds' mean IoUs, keyed by prompt kind and ``refine``.
    """
    encoder, count = sam.prompt_encoder, len(prompts.targets)
    image_pe = encoder.get_dense_pe()
    ones = torch.ones(count, 1, dtype=torch.int)
    points = None if prompts.kind == "box" else (prompts.points, ones)
    # A single point is ambiguous: three masks, and only the best one's loss counts.
    multimask = prompts.kind == "point"
    with watch.phase("decoder_forward"):
        sparse, dense = encoder(points=points, boxes=prompts.boxes, masks=None)
        logits, iou_pred = decode(
            sam.mask_decoder, embedding, image_pe, sparse, dense[:1], multimask
        )
    with watch.phase("loss"):
        loss, iou = mask_losses(logits, prompts.targets, config.focal_weight, config.focal_alpha)
        rows, best = torch.arange(count), loss.argmin(dim=1)
        total = loss[rows, best].mean() + config.iou_weight * F.mse_loss(iou_pred.float(), iou)
        parts = {prompts.kind: float(iou[rows, best].mean())}
    if not config.refine:
        return total, parts

    with watch.phase("prompts"):
        previous = logits[rows, best].detach()
        click, label = error_clicks(previous > 0, prompts.targets > 0.5, g)
        scale = embedding.new_tensor(encoder.input_image_size[0] / previous.shape[-1])
        click = (click * scale)[:, None]
        if points is None:
            points = (click, label[:, None])
        else:
            points = (torch.cat([points[0], click], 1), torch.cat([points[1], label[:, None]], 1))
    with watch.phase("decoder_forward"):
        sparse, dense = encoder(points=points, boxes=prompts.boxes, masks=previous[:, None])
        logits, iou_pred = decode(sam.mask_decoder, embedding, image_pe, sparse, dense, False)
    with watch.phase("loss"):
        loss, iou = mask_losses(logits, prompts.targets, config.focal_weight, config.focal_alpha)
        total = total + loss.mean() + config.iou_weight * F.mse_loss(iou_pred.float(), iou)
        parts["refine"] = float(iou.mean())
    return total, parts


def batch_loss(
    sam: Sam,
    decode: Decode,
    embeddings: Tensor,
    batch: Batch,
    config: StepConfig,
    g: torch.Generator,
    watch: Stopwatch = OFF,
) -> tuple[Tensor, dict[str, list[float]]]:
    """The mean loss over a batch's images, and every image's round IoUs by key.

    Arguments:
      embeddings (Tensor): BxCxhxw image embeddings of ``batch``.
      batch (Batch): the step's images and labels.
    Returns:
      (tuple): the scalar loss (float32) and per key the IoUs of the images that had it.
    """
    low = sam.prompt_encoder.mask_input_size[0]
    total = embeddings.new_zeros((), dtype=torch.float32)
    parts: dict[str, list[float]] = {}
    for b, size in enumerate(batch.sizes):
        with watch.phase("prompts"):
            prompts = sample_prompts(batch.labels[b], size, low, config, g)
        if prompts is None:
            continue
        loss, image_parts = image_loss(
            sam, decode, embeddings[b : b + 1], prompts, config, g, watch
        )
        total = total + loss
        for key, value in image_parts.items():
            parts.setdefault(key, []).append(value)
    return total / len(batch.sizes), parts
