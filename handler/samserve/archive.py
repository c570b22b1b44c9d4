"""What a worker reads from its model archive: the model's spec, the handler settings, the
checkpoint, and the device TorchServe gave it.

TorchServe hands a handler these as plain mappings (``context.model_yaml_config``,
``context.system_properties``, ``context.manifest``); reading them here keeps the
handlers free of parsing and the parsing free of ``ts``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import SamSpec
from .settings import Settings
from .store import model_identity


@dataclass(frozen=True)
class ArchiveConfig:
    """A worker's model and settings as its archive gives them.

    Arguments:
      spec (SamSpec): the model's sizes (``handler.spec`` in model-config.yaml).
      settings (Settings): the rest of the ``handler:`` section.
      checkpoint (Path or None): the archive's serialized file, None for random weights.
      device (torch.device): ``cuda:<gpu_id>`` when TorchServe gave the worker a GPU and
        torch sees one, else the CPU.
    """

    spec: SamSpec
    settings: Settings
    checkpoint: Path | None
    device: torch.device

    @classmethod
    def read(
        cls,
        yaml_config: Mapping[str, Any] | None,
        properties: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> ArchiveConfig:
        """The config of a worker, from TorchServe's context mappings.

        Arguments:
          yaml_config (mapping or None): ``context.model_yaml_config``.
          properties (mapping): ``context.system_properties`` (``model_dir``, ``gpu_id``).
          manifest (mapping): ``context.manifest`` (``model.serializedFile``).
        """
        config = dict((yaml_config or {}).get("handler", {}))
        spec = SamSpec.from_dict(config.pop("spec", {"name": "vit_b"}))
        settings = Settings.from_dict(config)
        serialized = manifest["model"].get("serializedFile")
        checkpoint = Path(properties["model_dir"]) / serialized if serialized else None
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            device = torch.device(f"cuda:{gpu_id}")
        else:
            device = torch.device("cpu")
        return cls(spec, settings, checkpoint, device)

    def model_id(self) -> str | None:
        """The identity of the weights this archive serves (its spec and the checkpoint's
        SHA-256): what the shared store's entries are checked against, so that another
        model's embeddings are never read as this one's. None without a checkpoint: each
        worker then draws weights of its own, and none may share embeddings."""
        if self.checkpoint is None:
            return None
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as weights:
            for chunk in iter(lambda: weights.read(1 << 20), b""):
                digest.update(chunk)
        return model_identity(json.dumps(self.spec.to_dict(), sort_keys=True), digest.hexdigest())
