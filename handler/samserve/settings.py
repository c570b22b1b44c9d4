"""Handler settings, read from the ``handler:`` section of the archive's model-config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .encoder import EncoderOptions
from .matmul import check_backend
from .store import DEFAULT_STORE_URL, StoreOptions

# The smallest max_response_bytes: room for any error reply, whose message of at most
# errors.MAX_MESSAGE_BYTES grows at most sixfold when JSON escapes it.
MIN_RESPONSE_BYTES = 8 * 1024


@dataclass(frozen=True)
class Settings:
    """Cache sizes, input limits and runtime knobs; every field has a usable default."""

    embedding_cache_mb: float = 1024.0
    logits_cache_mb: float = 256.0
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    max_prompts: int = 256
    max_points_per_prompt: int = 64
    # Full-size mask pixels one request may ask for (prompts x masks per prompt x image
    # pixels; for segment everything, the masks that pass pred_iou_thresh x their crop's
    # pixels): 256 prompts x 3 masks on a 12-megapixel photo fit; the same on a 64 MP
    # image would keep the worker busy past TorchServe's response timeout.
    max_mask_pixels: int = 10_000_000_000
    # Largest JSON response; keep it below TorchServe's max_response_size (set in
    # config.properties): a bigger response makes the frontend drop the worker.
    max_response_bytes: int = 63 * 1024 * 1024
    # Segment everything: point prompts decoded over all crops (a 64x64 grid, or a 32x32
    # one with a crop layer at half the density), crops encoded anew (one crop layer),
    # and the wall time of its generator, checked between batches of points; each bounds
    # how long one request can hold a worker, well within the archive's responseTimeout.
    max_everything_points: int = 4096
    max_everything_crops: int = 4
    max_everything_seconds: float = 60.0
    # Uncached images per encoder call and prompts per mask-decoder call (see
    # SamEngine.embed and predict); 0: by device (samserve.engine.default_call_sizes).
    encoder_batch_size: int = 0
    decoder_batch_size: int = 0
    torch_threads: int = 0  # 0: the machine's cores divided among the model's workers
    prompt_threads: int = 0  # threads decoding prompts and encoding masks; 0: torch threads
    # The shared embedding store (samserve.store's URL grammar); SAMSERVE_STORE_URL
    # overrides it.
    store_url: str = DEFAULT_STORE_URL
    cpu_matmul: str = "auto"  # float32 products on a CPU: auto, onednn or torch (samserve.matmul)
    # The image encoder (samserve.encoder.EncoderOptions): its autocast dtype (auto:
    # bfloat16 on CUDA, float32 on a CPU), its attention (auto: sdpa on CUDA, sliced on
    # a CPU), and torch.compile, paid by a warm-up encode when the worker starts.
    encoder_dtype: str = "auto"
    encoder_attention: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        check_backend(self.cpu_matmul)
        # A bad encoder setting fails at registration.
        EncoderOptions(self.encoder_dtype, self.encoder_attention, self.compile)
        StoreOptions.from_url(self.store_url)  # a bad URL fails at registration
        if self.max_response_bytes < MIN_RESPONSE_BYTES:
            raise ValueError(
                f"max_response_bytes must be at least {MIN_RESPONSE_BYTES}: an error reply must fit"
            )
        if not self.max_everything_seconds > 0:
            raise ValueError("max_everything_seconds must be positive")
        for name in ("encoder_batch_size", "decoder_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be positive, or 0 for the device's default")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings from a mapping; keys that are not settings raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)
