"""Handler settings, read from the ``handler:`` section of the archive's model-config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .matmul import check_backend


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
    # pixels): 256 prompts x 3 masks on a 12-megapixel photo fit; the same on a 64 MP
    # image would keep the worker busy past TorchServe's response timeout.
    max_mask_pixels: int = 10_000_000_000
    # Largest JSON response; keep it below TorchServe's max_response_size (64 MiB in
    # config.properties): a bigger response makes the frontend drop the worker.
    max_response_bytes: int = 63 * 1024 * 1024
    encoder_batch_size: int = 2
    decoder_batch_size: int = 4  # prompts per mask-decoder call (see SamEngine.predict)
    torch_threads: int = 0  # 0: the machine's cores divided among the model's workers
    mask_threads: int = 0  # threads making and encoding masks side by side; 0: torch threads
    cpu_matmul: str = "auto"  # float32 products on a CPU: auto, onednn or torch (samserve.matmul)

    def __post_init__(self) -> None:
        check_backend(self.cpu_matmul)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings from a mapping; keys that are not settings raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)
