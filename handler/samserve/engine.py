"""The SAM engine: embed an image once, cache the embedding, decode prompts against it.

Numpy at the edges, torch inside, as in ``segment_anything.SamPredictor``: the image
goes through SAM's own transforms (``ResizeLongestSide``, ``Sam.preprocess``) and the
prompt encoder / mask decoder are called exactly as ``SamPredictor.predict_torch``
calls them, so results match the predictor for the same model.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from .cache import LRUCache
from .decoder import ImageProjections, PaddingLogits, predict_masks, project_image
from .masks import Mapper, MaskRuns
from .process import MIB
from .upscale import compile_mask_pass, tokens_read, upscale_masks


@dataclass(frozen=True)
class ImageEmbedding:
    """What decoding prompts on one image needs.

    ``embedding`` is 1xCxhxw on the model's device (1x256x64x64 for official SAM);
    ``input_size`` is (H, W) of the resized image before padding; ``original_size`` is
    (H, W) of the image as decoded. ``projections`` (``samserve.decoder.project_image``)
    spare every decoder call without a mask input the first block's image-side work.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    projections: ImageProjections | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the embedding and its projections (what the cache bound counts)."""
        projected = 0 if self.projections is None else self.projections.nbytes
        return self.embedding.element_size() * self.embedding.nelement() + projected


@dataclass(frozen=True)
class Prompt:
    """One prompt, in SAM's names, in the original image frame.

    ``point_coords`` is Nx2 (X, Y) pixels with ``point_labels`` N (1 foreground,
    0 background); ``box`` is 4 (X0, Y0, X1, Y1); ``mask_input`` is 1xhxw low-res logits
    from an earlier prediction on the same image (h = w = 4 x embedding side).
    """

    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    @property
    def signature(self) -> tuple[int, bool, bool]:
        """Prompts with equal signatures have equal tensor shapes and batch together."""
        n_points = 0 if self.point_coords is None else len(self.point_coords)
        return n_points, self.box is not None, self.mask_input is not None


@dataclass(frozen=True)
class Prediction:
    """The decoder's answer to one prompt.

    ``masks`` are C masks of HxW in the original frame (C = 3 with multimask, else 1),
    each kept as its COCO RLE (``MaskRuns``); ``scores`` is C predicted IoUs,
    ``low_res_logits`` is Cxhxw float32. With ``padding``, the logits over the padding
    (which no mask pixel reads) are zeros until ``complete_logits`` makes them.
    """

    masks: list[MaskRuns]
    scores: np.ndarray
    low_res_logits: np.ndarray
    padding: PaddingLogits | None = None

    def complete_logits(self) -> np.ndarray:
        """``low_res_logits`` with the padding's part made (in place, once)."""
        if self.padding is not None:
            for index, logits in enumerate(self.low_res_logits):
                self.padding.fill(torch.from_numpy(logits), index)
            object.__setattr__(self, "padding", None)
        return self.low_res_logits

    def logits_to_store(self, image_id: str, index: int) -> StoredLogits:
        """The logits of mask ``index`` to keep for a later ``mask_input`` (their part
        over the padding made when first read)."""
        logits = self.low_res_logits[index : index + 1].copy()
        return StoredLogits(image_id, logits, self.padding, index)

    def dense_masks(self) -> np.ndarray:
        """The masks as one CxHxW bool array, as ``SamPredictor.predict`` returns them."""
        return np.stack([mask.dense() for mask in self.masks])


class StoredLogits:
    """Low-res logits kept so a later request can pass them back as ``mask_input``.

    ``logits`` is 1xhxw float32. Given ``padding`` (the ``PaddingLogits`` of their prompt,
    ``index`` their mask's place in it), their part over the padding is made the first
    time they are read: most stored logits never are. ``logits_id`` is a content hash
    of the image id and the logits as given (their part over the padding follows from
    the rest: the decoder's attention mixes every image token), so the same prompt on
    the same image gets the same id.
    """

    def __init__(
        self,
        image_id: str,
        logits: np.ndarray,
        padding: PaddingLogits | None = None,
        index: int = 0,
    ) -> None:
        self.image_id = image_id
        self._logits = np.ascontiguousarray(logits.reshape((1, *logits.shape[-2:])), np.float32)
        self._padding = padding
        self._index = index
        self._lock = threading.Lock()
        self.nbytes = self._logits.nbytes + (0 if padding is None else padding.nbytes)
        content = image_id.encode() + self._logits.tobytes()
        self.logits_id = hashlib.sha256(content).hexdigest()[:32]

    @property
    def logits(self) -> np.ndarray:
        """The 1xhxw logits, complete."""
        with self._lock:
            if self._padding is not None:
                self._padding.fill(torch.from_numpy(self._logits), self._index)
                self._padding = None
            return self._logits


def _failed(image_id: str, error: Exception, failures: dict[str, Exception] | None) -> None:
    """Record that ``image_id`` could not be encoded, or raise ``error`` without
    ``failures``."""
    if failures is None:
        raise error
    failures[image_id] = error


def decode_prompts(
    model: Sam,
    embedding: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
    best_only: bool = False,
    image_pe: torch.Tensor | None = None,
    projections: ImageProjections | None = None,
    inside: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[PaddingLogits] | None]:
    """Prompt encoder + mask decoder for B prompts on one embedding, as
    ``SamPredictor.predict_torch`` calls them (with ``samserve.decoder``'s equivalent of
    ``Sam.mask_decoder``). Gradients flow: training uses it.

    Arguments:
      model (Sam): the model.
      embedding (torch.Tensor): the image's 1xCxhxw embedding.
      points (tuple(torch.Tensor, torch.Tensor) or None): BxNx2 point coordinates in the
        model's input frame and their BxN labels (1 foreground, 0 background).
      boxes (torch.Tensor or None): Bx4 boxes (X0, Y0, X1, Y1) in the model's input frame.
      mask_input (torch.Tensor or None): Bx1x(4h)x(4w) low-res logits of earlier
        predictions, in the padded input frame.
      multimask (bool): SAM's three masks per prompt, else its single-mask token.
      best_only (bool): keep, of each prompt's masks, the one with the highest predicted
        IoU (the first of equal scores); the others are never made.
      image_pe (torch.Tensor or None): ``model.prompt_encoder.get_dense_pe()``, 1xCxhxw;
        computed when not given (a fixed function of the model: callers that decode
        often compute it once).
      projections (ImageProjections or None): the embedding's first-block projections
        (``ImageEmbedding.projections``).
      inside (tuple(int, int) or None): the (rows, columns) of image tokens a full-size
        mask reads; with it, the logits over the rest (the padding) are made on demand.

    Returns:
      (torch.Tensor): BxKx(4h)x(4w) low-res logits, K = 3 with ``multimask``, else 1
        (1 with ``best_only``).
      (torch.Tensor): their BxK predicted IoUs.
      (list(PaddingLogits) or None): with ``inside``, per prompt, what makes its logits
        over the padding (see ``samserve.decoder.predict_masks``); else None.
    """
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    if mask_input is None:
        dense = dense[:1]  # the "no mask" embedding, the same for every prompt
    else:
        projections = None  # they were made with the "no mask" embedding

    def choose(iou: torch.Tensor) -> torch.Tensor:
        """Bx(1+M) IoU predictions -> BxK mask tokens: 1..M with multimask, else 0."""
        first, stop = (1, iou.shape[1]) if multimask else (0, 1)
        tokens = torch.arange(first, stop, device=iou.device).expand(len(iou), -1)
        if best_only:
            tokens = tokens.gather(1, iou[:, first:stop].argmax(dim=1, keepdim=True))
        return tokens

    return predict_masks(
        model.mask_decoder,
        embedding,
        model.prompt_encoder.get_dense_pe() if image_pe is None else image_pe,
        sparse,
        dense,
        choose,
        projections,
        inside,
    )


class SamEngine:
    """Runs one SAM model with an embedding cache keyed by ``image_id``.

    The image encoder runs once per image; every later prompt on that image runs only
    the prompt encoder and mask decoder against the cached embedding.
    """

    def __init__(
        self,
        model: Sam,
        embedding_cache_bytes: int = 1024 * MIB,
        logits_cache_bytes: int = 256 * MIB,
        encoder_batch_size: int = 1,
        decoder_batch_size: int = 4,
    ) -> None:
        self.model = model.eval()
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.encoder_batch_size = max(1, encoder_batch_size)
        self.decoder_batch_size = max(1, decoder_batch_size)
        self.embeddings: LRUCache[ImageEmbedding] = LRUCache(
            embedding_cache_bytes, lambda e: e.nbytes
        )
        self.logits: LRUCache[StoredLogits] = LRUCache(logits_cache_bytes, lambda s: s.nbytes)
        self.encoder_runs = 0  # images encoded, for tests and stats
        with torch.inference_mode():
            self.image_pe = model.prompt_encoder.get_dense_pe()
            # The dense embedding of prompts without a mask input ("no mask"), 1xCxhxw.
            self.no_mask_dense = model.prompt_encoder(points=None, boxes=None, masks=None)[1]
        compile_mask_pass()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an image of ``original_size`` (H, W) resized by SAM's
        ``ResizeLongestSide`` for the encoder, before padding.

        Raises:
          ValueError: when a side would have no pixels (an image whose long side is more
            than about twice the encoder's input size times its short side), which SAM's
            transform cannot resize.
        """
        height, width = original_size
        size = ResizeLongestSide.get_preprocess_shape(height, width, self.transform.target_length)
        if min(size) < 1:
            raise ValueError(
                f"a {width}x{height} image resizes to {size[1]}x{size[0]} for the model's "
                f"{self.transform.target_length}-pixel input: a side with no pixels"
            )
        return size

    def embed(
        self,
        images: dict[str, np.ndarray],
        failures: dict[str, Exception] | None = None,
    ) -> dict[str, ImageEmbedding]:
        """Embed HxWx3 uint8 RGB images keyed by ``image_id`` and cache the results.

        Images run through the encoder in chunks of ``encoder_batch_size``; when a chunk
        fails, its images run again one by one, so that one image that cannot be encoded
        does not fail the others.

        Arguments:
          images (dict(str, np.ndarray)): HxWx3 uint8 RGB images by ``image_id``.
          failures (dict(str, Exception) or None): where to put the exception of each
            image that fails alone; None: raise it.

        Returns:
          (dict(str, ImageEmbedding)): the embedding of every image that was encoded,
            including any the cache could not hold.
        """
        keys = list(images)
        out: dict[str, ImageEmbedding] = {}
        for start in range(0, len(keys), self.encoder_batch_size):
            chunk = keys[start : start + self.encoder_batch_size]
            try:
                out.update(zip(chunk, self._encode([images[k] for k in chunk])))
            except Exception as err:
                if len(chunk) == 1:
                    _failed(chunk[0], err, failures)
                    continue
                for image_id in chunk:  # alone, each image that can be encoded is
                    try:
                        (out[image_id],) = self._encode([images[image_id]])
                    except Exception as alone:
                        _failed(image_id, alone, failures)
            for image_id in chunk:
                if image_id in out:
                    self.embeddings.put(image_id, out[image_id])
        return out

    def cached_embedding(self, image_id: str) -> ImageEmbedding | None:
        """The cached embedding of ``image_id`` or None (counts a cache hit or miss)."""
        return self.embeddings.get(image_id)

    @torch.inference_mode()
    def _encode(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Encode HxWx3 uint8 RGB images in one encoder call, as ``SamPredictor.set_image``."""
        inputs, input_sizes = [], []
        for image in images:
            self.input_size(image.shape[:2])  # a side with no pixels fails here, not in torch
            resized = self.transform.apply_image(image)
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            inputs.append(self.model.preprocess(tensor[None]))
            input_sizes.append(tuple(tensor.shape[-2:]))
        features = self.model.image_encoder(torch.cat(inputs))
        self.encoder_runs += len(images)
        return [
            self.image_embedding(features[i : i + 1], input_sizes[i], tuple(image.shape[:2]))
            for i, image in enumerate(images)
        ]

    @torch.inference_mode()
    def image_embedding(
        self, features: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> ImageEmbedding:
        """The ``ImageEmbedding`` of one image's 1xCxhxw encoder output, as the cache keeps
        it: a channels-last copy (C innermost in memory, the same 1xCxhxw tensor to every
        op: the decoder reads it as h x w rows of C channels, and this layout spares each
        decoder call a transposing copy) and its first-block projections."""
        embedding = features.clone(memory_format=torch.channels_last)
        projections = project_image(
            self.model.mask_decoder, embedding, self.image_pe, self.no_mask_dense
        )
        return ImageEmbedding(embedding, input_size, original_size, projections)

    @torch.inference_mode()
    def predict(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask: bool = True,
        timing_ms: dict[str, float] | None = None,
        best_only: bool = False,
        map_fn: Mapper = map,
        defer_padding: bool = False,
        rle: bool = True,
    ) -> list[Prediction]:
        """Decode ``prompts`` on one embedded image, as ``SamPredictor.predict`` does for
        each; one prediction per prompt, in order.

        Prompts of equal shape (same number of points, box or not, mask_input or not) go
        through the prompt encoder and mask decoder together, ``decoder_batch_size`` per
        call: each prompt adds NxC image-side tensors to a call, and once a tensor passes
        glibc's ``mmap`` threshold (see ``keep_freed_memory``) it is mapped afresh on every
        op, so larger calls get slower per prompt.

        Arguments:
          embedding (ImageEmbedding): the image's cached embedding.
          prompts (Sequence(Prompt)): the prompts, in the original image frame.
          multimask (bool): SAM's three masks per prompt, else one.
          timing_ms (dict(str, float) or None): if given, accumulates the milliseconds
            spent in the prompt encoder and mask decoder (``decoder``) and in making
            full-size masks and their RLE (``upscale``).
          best_only (bool): keep only the highest-scoring of each prompt's masks (the one
            a click UI shows); the others are never made full size.
          map_fn (Mapper): makes the full-size masks, one per item (``map``, or a thread
            pool's; see ``upscale_masks``).
          defer_padding (bool): make the low-res logits over the padding, which no mask
            pixel reads, only when asked for (``Prediction.padding``): for a 4:3 image, a
            quarter of the image tokens are left out of the decoder's upscaling.
          rle (bool): masks carry their COCO RLE; else their box and area only
            (``MaskRuns``): no RLE, no pixels.

        Returns:
          (list(Prediction)): per prompt, C masks of HxW in the original frame (C = 3
            with ``multimask``, 1 without it or with ``best_only``), their C predicted
            IoUs and their Cx(4h)x(4w) low-res logits in the padded input frame.
        """
        predictions: list[Prediction | None] = [None] * len(prompts)
        groups: dict[tuple[int, bool, bool], list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature, []).append(index)
        for group in groups.values():
            for start in range(0, len(group), self.decoder_batch_size):
                indices = group[start : start + self.decoder_batch_size]
                batch = [prompts[i] for i in indices]
                answers = self._predict_batch(
                    embedding, batch, multimask, best_only, timing_ms, map_fn, defer_padding,
                    rle,
                )  # fmt: skip
                for i, prediction in zip(indices, answers):
                    predictions[i] = prediction
        return predictions  # type: ignore[return-value]

    def _predict_batch(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask: bool,
        best_only: bool,
        timing_ms: dict[str, float] | None,
        map_fn: Mapper,
        defer_padding: bool,
        rle: bool,
    ) -> list[Prediction]:
        """Decode B prompts of one signature in one call, as ``SamPredictor.predict_torch``."""
        started = time.perf_counter()
        first = prompts[0]
        original_size = embedding.original_size
        points = boxes = masks = None
        if first.point_coords is not None:
            coords = np.stack(
                [self.transform.apply_coords(p.point_coords, original_size) for p in prompts]
            )
            labels = np.stack([p.point_labels for p in prompts])
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=self.device),
                torch.as_tensor(labels, dtype=torch.int, device=self.device),
            )
        if first.box is not None:
            box = np.stack([self.transform.apply_boxes(p.box, original_size)[0] for p in prompts])
            boxes = torch.as_tensor(box, dtype=torch.float, device=self.device)
        if first.mask_input is not None:
            mask = np.stack([p.mask_input for p in prompts])
            masks = torch.as_tensor(mask, dtype=torch.float, device=self.device)

        low_res, iou, padding = self.decode(
            embedding, points, boxes, masks, multimask, best_only, defer_padding
        )
        low_res, iou = low_res.float().cpu(), iou.float().cpu()  # waits for a GPU
        decoded = time.perf_counter()
        # All the call's masks in one map: a pool's threads share them.
        masks = upscale_masks(
            low_res.flatten(0, 1),
            embedding.input_size,
            original_size,
            self.model.image_encoder.img_size,
            self.model.mask_threshold,
            map_fn,
            rle,
        )
        per_prompt = low_res.shape[1]
        predictions = [
            Prediction(
                masks=masks[i * per_prompt : (i + 1) * per_prompt],
                scores=scores.numpy(),
                low_res_logits=logits.numpy(),
                padding=None if padding is None else padding[i],
            )
            for i, (logits, scores) in enumerate(zip(low_res, iou))
        ]
        if timing_ms is not None:
            timing_ms["decoder"] = timing_ms.get("decoder", 0.0) + (decoded - started) * 1000
            upscale_ms = (time.perf_counter() - decoded) * 1000
            timing_ms["upscale"] = timing_ms.get("upscale", 0.0) + upscale_ms
        return predictions

    def decode(
        self,
        embedding: ImageEmbedding,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
        best_only: bool = False,
        defer_padding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[PaddingLogits] | None]:
        """``decode_prompts`` on a cached ``embedding`` (inputs in the model's input frame),
        with the engine's positional encoding and the embedding's projections; with
        ``defer_padding``, the logits over the padding are left to ``PaddingLogits``."""
        return decode_prompts(
            self.model,
            embedding.embedding,
            points,
            boxes,
            mask_input,
            multimask,
            best_only,
            self.image_pe,
            embedding.projections,
            self.tokens_read(embedding) if defer_padding else None,
        )

    def tokens_read(self, embedding: ImageEmbedding) -> tuple[int, int]:
        """The first (rows, columns) of the embedding's image tokens whose low-res logits
        its full-size masks read (``upscale.tokens_read``); the rest lie under padding."""
        return tokens_read(
            tuple(embedding.embedding.shape[-2:]),
            embedding.input_size,
            embedding.original_size,
            self.model.image_encoder.img_size,
        )

    def store_logits(self, stored: StoredLogits) -> str:
        """Keep low-res logits for reuse as ``mask_input``; returns their ``logits_id``."""
        self.logits.put(stored.logits_id, stored)
        return stored.logits_id

    def stored_logits(self, logits_id: str) -> StoredLogits | None:
        """Logits stored under ``logits_id``, or None if never stored or evicted."""
        return self.logits.get(logits_id)
