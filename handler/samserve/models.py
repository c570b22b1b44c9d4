"""SAM architectures by spec, and building them from a checkpoint.

The official sizes (``vit_b``, ``vit_l``, ``vit_h``) are built through
``segment_anything.sam_model_registry``; smaller specs used for tests and demos are
built from the same ``segment_anything`` modules with other sizes. A spec is a plain
dict in the archive's ``model-config.yaml``, so one handler serves every size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention

from . import matmul
from .encoder import SlicedAttention


@dataclass(frozen=True)
class SamSpec:
    """The architecture of a SAM model; the defaults are the official vit_h decoder side.

    ``image_size`` is the encoder's square input side in pixels; the image embedding is
    ``image_size / patch_size`` per side and the low-res mask logits are 4x that.
    ``stem_channels`` empty: SAM's patchify (one ``patch_size`` x ``patch_size`` convolution);
    else a ``ConvStem`` of one stride-2 3x3 convolution per entry, with these widths, down to
    the same token grid (so ``patch_size`` must be 2 ** len(stem_channels)).
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Reject a convolutional stem that would not reach the patch grid."""
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(
                f"a stem of {len(self.stem_channels)} stride-2 convolutions reaches patch "
                f"{2 ** len(self.stem_channels)}, not patch_size {self.patch_size}"
            )

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding (64 for official SAM)."""
        return self.image_size // self.patch_size

    @property
    def is_official(self) -> bool:
        """True when this spec is exactly one of segment_anything's registry models."""
        official = OFFICIAL_SPECS.get(self.name)
        return official is not None and official == self

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly dict that ``from_dict`` reads back."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamSpec:
        """Build a spec from ``to_dict`` output, or from ``{"name": "vit_b"}`` alone."""
        if set(data) == {"name"}:
            return spec_by_name(data["name"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SamSpec fields: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


OFFICIAL_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamSpec("vit_b", 768, 12, 12, (2, 5, 8, 11)),
}

SMALL_SPECS: dict[str, SamSpec] = {
    # Full 1024 input and standard decoder, tiny encoder: exercises the official
    # frame sizes (64x64 embedding, 256x256 logits) at a fraction of the cost.
    "sam_tiny": SamSpec("sam_tiny", 128, 2, 4, (1,), window_size=8),
    # Everything small (256 input, 16x16 embedding, 64x64 logits): fast unit tests.
    "sam_micro": SamSpec(
        "sam_micro",
        64,
        2,
        2,
        (1,),
        image_size=256,
        window_size=4,
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
        mask_in_chans=8,
    ),
    # The project's trained model (docs/model_card.md): 512 input, 2.7 M parameters.
    "sam_small": SamSpec(
        "sam_small",
        160,
        6,
        5,
        (2, 5),
        image_size=512,
        window_size=8,
        prompt_embed_dim=96,
        decoder_mlp_dim=384,
        decoder_num_heads=4,
        iou_head_hidden_dim=96,
    ),
}


def spec_by_name(name: str) -> SamSpec:
    """The official or small spec called ``name``."""
    specs = {**OFFICIAL_SPECS, **SMALL_SPECS}
    if name not in specs:
        raise ValueError(f"unknown SAM spec {name!r}; known: {sorted(specs)}")
    return specs[name]


def build_sam(spec: SamSpec, checkpoint: str | os.PathLike | None = None) -> Sam:
    """Build a SAM model for ``spec`` in eval mode, loading ``checkpoint`` if given.

    Official specs go through ``sam_model_registry``; others are assembled from the
    same modules exactly as ``segment_anything.build_sam._build_sam`` does, with the
    spec's sizes. Checkpoints are plain state dicts (official files, or fp16 ones).
    Its linear layers are swapped for ``samserve.matmul.Linear`` (products through the
    process's CPU backend), and its encoder's attention for ``SlicedAttention`` (global
    attention slice by slice: the same bits), holding the same parameters under the same
    state dict keys.
    """
    if spec.is_official:
        sam = sam_model_registry[spec.name]()
    else:
        sam = assemble_sam(spec)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        sam.load_state_dict(state)
    swap_modules(sam, torch.nn.Linear, matmul.Linear.from_linear)
    swap_modules(sam.image_encoder, Attention, SlicedAttention.from_attention)
    return sam.eval()


def swap_modules(
    root: torch.nn.Module,
    old: type[torch.nn.Module],
    convert: Callable[[Any], torch.nn.Module],
) -> int:
    """Replace every submodule of ``root`` of exactly type ``old`` by ``convert`` of it, set
    on its parent under the same name (as ``torch.ao.quantization``'s ``swap_module``).

    Arguments:
      root (torch.nn.Module): the model, changed in place (``root`` itself is not replaced).
      old (type): the type replaced; its subclasses are left alone, so a second call with
        the same arguments changes nothing.
      convert (Callable): makes the replacement from a module of type ``old``; for the
        same state dict keys it must hold the module's own parameters under their names
        (``matmul.Linear.from_linear``, ``SlicedAttention.from_attention``). A module
        shared by several parents is converted once.

    Returns:
      (int): how many submodules were replaced.
    """
    replaced: dict[torch.nn.Module, torch.nn.Module] = {}  # modules hash by identity
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                if child not in replaced:
                    replaced[child] = convert(child)
                setattr(parent, name, replaced[child])
    return len(replaced)


class ConvStem(torch.nn.Module):
    """Pixels to patch tokens by stride-2 3x3 convolutions, in place of SAM's ``PatchEmbed``.

    Each convolution halves the resolution and is followed by a channel layer norm and GELU;
    a 1x1 convolution then makes the tokens. Early convolutions make small ViTs learn faster
    than one large-stride patchify (Xiao et al., "Early Convolutions Help Transformers See
    Better"). Same interface as ``PatchEmbed``: Bx3xHxW in, Bx(H/p)x(W/p)xC out.
    """

    def __init__(self, channels: tuple[int, ...], embed_dim: int, in_chans: int = 3) -> None:
        """Arguments:
        channels (tuple[int, ...]): the width of each stride-2 convolution, in order.
        embed_dim (int): C, the token width.
        in_chans (int): the image's channels.
        """
        super().__init__()
        layers: list[torch.nn.Module] = []
        previous = in_chans
        for width in channels:
            layers += [
                torch.nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                LayerNorm2d(width),
                torch.nn.GELU(),
            ]
            previous = width
        self.convs = torch.nn.Sequential(*layers)
        self.proj = torch.nn.Conv2d(previous, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW normalised pixels -> Bx(H/p)x(W/p)xC tokens (p = 2 ** len(channels))."""
        return self.proj(self.convs(x)).permute(0, 2, 3, 1)


def assemble_sam(spec: SamSpec) -> Sam:
    """A freshly initialised SAM with ``spec``'s sizes, built as ``_build_sam`` does (and
    with a ``ConvStem`` in place of the patchify when the spec names one)."""
    embedding_size = spec.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(spec.pixel_mean),
        pixel_std=list(spec.pixel_std),
    )
    if spec.stem_channels:
        sam.image_encoder.patch_embed = ConvStem(spec.stem_channels, spec.encoder_embed_dim)
    return sam


def random_checkpoint(spec: SamSpec, path: str | os.PathLike, seed: int = 0) -> None:
    """Write a deterministic randomly initialised state dict for ``spec`` to ``path``."""
    torch.manual_seed(seed)
    sam = assemble_sam(spec)
    torch.save(sam.state_dict(), path)
