"""The SAM engine: embed an image once, cache the embedding, decode prompts against it.

Numpy at the edges, torch inside, as in ``segment_anything.SamPredictor``: the image
goes through SAM's own transforms (``ResizeLongestSide``, ``Sam.preprocess``) and the
prompt encoder / mask decoder are called exactly as ``SamPredictor.predict_torch``
calls them, so results match the predictor for the same model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from .cache import LRUCache
from .decoder import ImageProjections, predict_masks, project_image
from .device_masks import upscale_masks_on_device
from .encoder import EncoderOptions, use_sdpa
from .masks import Mapper, MaskRuns
from .process import MIB
from .store import SharedStore
from .store_codec import Entry, EntrySpec
from .timing import stage
from .upscale import compile_mask_pass, upscale_masks

V = TypeVar("V")


@dataclass(frozen=True)
class CallSizes:
    """How much one model call takes when the settings leave it to the device (0).

    Arguments:
      encoder (int): uncached images per image-encoder call.
      decoder (int): prompts per mask-decoder call.
    """

    encoder: int
    decoder: int


# On a CPU a decoder call's image-side tensors outgrow the caches past a few prompts
# (``SamEngine.predict``) and larger encoder calls gain nothing; a GPU pays the same
# kernel launches for a call of any size and sits idle in small ones.
CPU_CALL_SIZES = CallSizes(encoder=2, decoder=4)
CUDA_CALL_SIZES = CallSizes(encoder=8, decoder=64)

Points = tuple[torch.Tensor, torch.Tensor]
"""BxNx2 point coordinates (X, Y) in the model's input frame and their BxN labels."""


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
class MaskOptions:
    """What a request asks of the decoder and of its masks.

    Arguments:
      multimask (bool): SAM's three masks per prompt (``multimask_output``), else its
        single-mask token.
      best_only (bool): keep, of each prompt's masks, the one with the highest predicted
        IoU (the first of equal scores); the others are never made.
      rle (bool): full-size masks carry their COCO RLE; else only their box and area.
    """

    multimask: bool = True
    best_only: bool = False
    rle: bool = True

    @property
    def masks_per_prompt(self) -> int:
        """Masks each prompt's prediction holds."""
        return 3 if self.multimask and not self.best_only else 1


@dataclass(frozen=True)
class Prediction:
    """The decoder's answer to one prompt.

    ``masks`` are C masks of HxW in the original frame (``MaskOptions.masks_per_prompt``),
    each kept as its COCO RLE (``MaskRuns``); ``scores`` is C predicted IoUs,
    ``low_res_logits`` is Cxhxw float32 in the padded input frame.
    """

    masks: list[MaskRuns]
    scores: np.ndarray
    low_res_logits: np.ndarray

    def dense_masks(self) -> np.ndarray:
        """The masks as one CxHxW bool array, as ``SamPredictor.predict`` returns them."""
        return np.stack([mask.dense() for mask in self.masks])

    def logits_to_store(self, image_id: str) -> StoredLogits:
        """The best-scoring mask's logits, to keep for a later ``mask_input``."""
        best = int(np.argmax(self.scores))
        return StoredLogits.of(image_id, self.low_res_logits[best])


@dataclass(frozen=True)
class StoredLogits:
    """Low-res logits kept so a later request can pass them back as ``mask_input``.

    ``logits`` is 1xhxw float32; ``logits_id`` is a content hash of the image id and the
    logits, so the same prompt on the same image gets the same id.
    """

    image_id: str
    logits: np.ndarray
    logits_id: str

    @classmethod
    def of(cls, image_id: str, logits: np.ndarray) -> StoredLogits:
        """The stored form of one mask's hxw (or 1xhxw) ``logits`` on ``image_id``."""
        logits = np.ascontiguousarray(logits.reshape((1, *logits.shape[-2:])), np.float32)
        content = image_id.encode() + logits.tobytes()
        return cls(image_id, logits, hashlib.sha256(content).hexdigest()[:32])

    @property
    def nbytes(self) -> int:
        """Bytes held by the logits (what the cache bound counts)."""
        return self.logits.nbytes


def default_call_sizes(device: torch.device) -> CallSizes:
    """The call sizes on ``device`` when none is set: ``CUDA_CALL_SIZES`` on CUDA,
    ``CPU_CALL_SIZES`` on a CPU (and any other device)."""
    return CUDA_CALL_SIZES if device.type == "cuda" else CPU_CALL_SIZES


def _failed(image_id: str, error: Exception, failures: dict[str, Exception] | None) -> None:
    """Record that ``image_id`` could not be encoded, or raise ``error`` without
    ``failures``."""
    if failures is None:
        raise error
    failures[image_id] = error


class SamEngine:
    """Runs one SAM model with an embedding cache keyed by ``image_id``.

    The image encoder runs once per image; every later prompt on that image runs only
    the prompt encoder and mask decoder against the cached embedding. Embeddings and
    stored logits live in two tiers: this process's LRU caches, then, when given, a
    ``SharedStore`` that every worker (and, with Redis, every host) reads and writes.

    The image encoder runs as ``encoder`` (``EncoderOptions``) says for the model's
    device, chosen once here: on CUDA by default with ``SdpaAttention`` in place of its
    attention modules (the model is changed in place) under bfloat16 autocast. Embeddings
    are kept as float32 whatever the encoder computed in, on the model's device.
    """

    def __init__(
        self,
        model: Sam,
        embedding_cache_bytes: int = 1024 * MIB,
        logits_cache_bytes: int = 256 * MIB,
        encoder_batch_size: int = 0,
        decoder_batch_size: int = 0,
        store: SharedStore | None = None,
        encoder: EncoderOptions | None = None,
    ) -> None:
        self.model = model.eval()
        self.store = store
        self.encoder_options = encoder = encoder or EncoderOptions()
        if encoder.uses_sdpa(self.device):
            use_sdpa(model.image_encoder)
        self._image_encoder: Callable[[torch.Tensor], torch.Tensor] = model.image_encoder
        if encoder.compile:
            self._image_encoder = torch.compile(model.image_encoder)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        # 0 (the default settings) is the device's size; a positive size is kept as given.
        sizes = default_call_sizes(self.device)
        self.encoder_batch_size = max(0, encoder_batch_size) or sizes.encoder
        self.decoder_batch_size = max(0, decoder_batch_size) or sizes.decoder
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
        channels, (height, width) = model.prompt_encoder.embed_dim, self.image_pe.shape[-2:]
        self._embedding_spec = EntrySpec(
            {"embedding": ((1, channels, height, width), "float32")},
            {"input_size": "pair", "original_size": "pair"},
        )
        self._logits_spec = EntrySpec(
            {"logits": ((1, 4 * height, 4 * width), "float32")}, {"image_id": "str"}
        )
        if encoder.compile:
            self._warm_up()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run the compiled encoder on blank batches of one image and of
        ``encoder_batch_size``, so that no request waits for the compiler: the second
        size makes ``torch.compile`` mark the batch dimension dynamic, which covers every
        smaller chunk too."""
        size = self.model.image_encoder.img_size
        for batch in sorted({1, self.encoder_batch_size}):
            self._run_encoder(torch.zeros(batch, 3, size, size, device=self.device))

    def _run_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image encoder on Bx3xSxS preprocessed pixels (S = ``img_size``), as
        ``encoder_options`` say, to BxCxhxw float32 features."""
        with self.encoder_options.autocast(self.device):
            features = self._image_encoder(pixels)
        return features.float()

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
                    self._share_embedding(image_id, out[image_id])
        return out

    def cached_embedding(self, image_id: str) -> ImageEmbedding | None:
        """The embedding of ``image_id`` from this process's cache, else from the shared
        store (then kept in this process's cache too), else None. Counts a hit or a miss
        in each tier it looks in."""
        return _from_tiers(self.embeddings, image_id, self._shared_embedding)

    def _shared_embedding(self, image_id: str) -> ImageEmbedding | None:
        """The embedding of ``image_id`` from the shared store (its projections made
        again here), or None."""
        if self.store is None:
            return None
        entry = self.store.get_embedding(image_id, self._embedding_spec)
        if entry is None:
            return None
        features = torch.from_numpy(entry.arrays["embedding"]).to(self.device)
        input_size, original_size = entry.meta["input_size"], entry.meta["original_size"]
        return self.image_embedding(features, tuple(input_size), tuple(original_size))

    def _share_embedding(self, image_id: str, embedding: ImageEmbedding) -> None:
        """Write a fresh embedding to the shared store (the exact float32 values; its
        projections follow from them and are made again by the reader)."""
        if self.store is None:
            return
        features = embedding.embedding.float().contiguous().cpu().numpy()
        meta = {"input_size": embedding.input_size, "original_size": embedding.original_size}
        self.store.put_embedding(image_id, Entry({"embedding": features}, meta))

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
        features = self._run_encoder(torch.cat(inputs))
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
        options: MaskOptions = MaskOptions(),
        map_fn: Mapper = map,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        """Decode ``prompts`` on one embedded image, as ``SamPredictor.predict`` does for
        each; one prediction per prompt, in order.

        Prompts of equal shape (same number of points, box or not, mask_input or not) go
        through the prompt encoder and mask decoder together, ``decoder_batch_size`` (or
        ``batch_size``) per call: on a CPU each prompt adds NxC image-side tensors to a
        call, and once a tensor passes glibc's ``mmap`` threshold (see
        ``samserve.process``) it is mapped afresh on every op, so larger calls get slower
        per prompt. Time spent goes to the ``decoder`` and ``upscale`` stages of
        ``samserve.timing``.

        Arguments:
          embedding (ImageEmbedding): the image's cached embedding.
          prompts (Sequence(Prompt)): the prompts, in the original image frame.
          options (MaskOptions): which masks to make, and whether with their RLE.
          map_fn (Mapper): makes the full-size masks, one per item (``map``, or a thread
            pool's; see ``upscale_masks``).
          batch_size (int or None): prompts per call at most; None: ``decoder_batch_size``.

        Returns:
          (list(Prediction)): per prompt, C masks of HxW in the original frame
            (``options.masks_per_prompt``), their C predicted IoUs and their
            Cx(4h)x(4w) low-res logits in the padded input frame.
        """
        predictions: list[Prediction | None] = [None] * len(prompts)
        groups: dict[tuple[int, bool, bool], list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature, []).append(index)
        step = batch_size or self.decoder_batch_size
        for group in groups.values():
            for start in range(0, len(group), step):
                indices = group[start : start + step]
                answers = self._predict_batch(
                    embedding, [prompts[i] for i in indices], options, map_fn
                )
                for i, prediction in zip(indices, answers):
                    predictions[i] = prediction
        return predictions  # type: ignore[return-value]

    def _predict_batch(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        options: MaskOptions,
        map_fn: Mapper,
    ) -> list[Prediction]:
        """Decode B prompts of one signature in one call, as ``SamPredictor.predict``."""
        with stage("decoder"):
            low_res, iou = self.predict_torch(
                embedding, *self._prompt_tensors(embedding, prompts), options
            )
            on_device = low_res
            low_res, iou = low_res.float().cpu(), iou.float().cpu()  # waits for a GPU
        with stage("upscale"):
            # All the call's masks in one map: a pool's threads share them. On CUDA they
            # are made where the logits are, and only their bits cross to the CPU.
            frame = (
                embedding.input_size,
                embedding.original_size,
                self.model.image_encoder.img_size,
            )
            threshold = self.model.mask_threshold
            if on_device.is_cuda:
                masks = upscale_masks_on_device(
                    on_device.flatten(0, 1), frame, threshold, map_fn, options.rle
                )
            else:
                masks = upscale_masks(low_res.flatten(0, 1), *frame, threshold, map_fn, options.rle)
        per_prompt = low_res.shape[1]
        return [
            Prediction(
                masks=masks[i * per_prompt : (i + 1) * per_prompt],
                scores=scores.numpy(),
                low_res_logits=logits.numpy(),
            )
            for i, (logits, scores) in enumerate(zip(low_res, iou))
        ]

    def _prompt_tensors(
        self, embedding: ImageEmbedding, prompts: Sequence[Prompt]
    ) -> tuple[Points | None, torch.Tensor | None, torch.Tensor | None]:
        """B prompts of one signature as ``predict_torch``'s points, boxes and mask
        inputs, in the model's input frame (as ``SamPredictor.predict`` transforms them)."""
        first, original_size = prompts[0], embedding.original_size
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
        return points, boxes, masks

    def predict_torch(
        self,
        embedding: ImageEmbedding,
        points: Points | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        options: MaskOptions = MaskOptions(),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for B prompts on one embedded image, as
        ``SamPredictor.predict_torch`` calls them (with ``samserve.decoder``'s equivalent of
        ``Sam.mask_decoder``). Gradients flow where the caller enables them.

        Arguments:
          embedding (ImageEmbedding): the image's embedding.
          points (tuple(torch.Tensor, torch.Tensor) or None): BxNx2 point coordinates in
            the model's input frame and their BxN labels (1 foreground, 0 background).
          boxes (torch.Tensor or None): Bx4 boxes (X0, Y0, X1, Y1) in the model's input
            frame.
          mask_input (torch.Tensor or None): Bx1x(4h)x(4w) low-res logits of earlier
            predictions, in the padded input frame.
          options (MaskOptions): ``multimask`` and ``best_only`` (``rle`` concerns
            full-size masks only).

        Returns:
          (torch.Tensor): BxKx(4h)x(4w) low-res logits, K = ``options.masks_per_prompt``.
          (torch.Tensor): their BxK predicted IoUs.
        """
        model = self.model
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        projections = embedding.projections
        if mask_input is None:
            dense = dense[:1]  # the "no mask" embedding, the same for every prompt
        else:
            projections = None  # they were made with the "no mask" embedding

        def select(iou: torch.Tensor) -> torch.Tensor:
            """Bx(1+M) IoU predictions -> BxK mask tokens: 1..M with multimask, else 0."""
            first, stop = (1, iou.shape[1]) if options.multimask else (0, 1)
            tokens = torch.arange(first, stop, device=iou.device).expand(len(iou), -1)
            if options.best_only:
                tokens = tokens.gather(1, iou[:, first:stop].argmax(dim=1, keepdim=True))
            return tokens

        return predict_masks(
            model.mask_decoder,
            embedding.embedding,
            self.image_pe,
            sparse,
            dense,
            select,
            projections,
        )

    def store_logits(self, stored: StoredLogits) -> str:
        """Keep low-res logits for reuse as ``mask_input``, in this process's cache and
        the shared store; returns their ``logits_id``."""
        self.logits.put(stored.logits_id, stored)
        if self.store is not None:
            entry = Entry({"logits": stored.logits}, {"image_id": stored.image_id})
            self.store.put_logits(stored.logits_id, entry)
        return stored.logits_id

    def stored_logits(self, logits_id: str) -> StoredLogits | None:
        """Logits stored under ``logits_id`` in this process's cache, else in the shared
        store, or None if never stored or evicted from both."""
        return _from_tiers(self.logits, logits_id, self._shared_logits)

    def _shared_logits(self, logits_id: str) -> StoredLogits | None:
        """Logits stored under ``logits_id`` in the shared store, or None."""
        if self.store is None:
            return None
        entry = self.store.get_logits(logits_id, self._logits_spec)
        if entry is None:
            return None
        return StoredLogits(str(entry.meta["image_id"]), entry.arrays["logits"], logits_id)


def _from_tiers(cache: LRUCache[V], key: str, shared: Callable[[str], V | None]) -> V | None:
    """``key``'s value from this process's ``cache``, else from the shared store through
    ``shared``, then kept in ``cache`` too."""
    value = cache.get(key)
    if value is None:
        value = shared(key)
        if value is not None:
            cache.put(key, value)
    return value
