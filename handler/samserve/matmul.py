"""float32 matrix products on a CPU through oneDNN where torch's default BLAS is slow.

torch multiplies float32 matrices on a CPU with MKL's sgemm. On AMD CPUs MKL runs its
AVX2 code, at a fraction of the rate of oneDNN's kernels (which torch ships for its
inductor and reduced-precision paths) on the same core, still in float32 (no bf16, no
tf32); docs/performance.md has the rates. On Intel CPUs MKL has AVX-512 kernels of its
own, so ``auto`` keeps torch's default there.

The choice is one process-wide backend, set once from the handler settings
(``cpu_matmul``) by ``samserve.process.tune_process``: the same products then always round
the same way in one worker. Until something sets it, products are torch's own.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "onednn", "torch")
"""``cpu_matmul`` values: ``auto`` (oneDNN on AMD CPUs, else torch's default), ``onednn``,
``torch`` (MKL or whatever BLAS torch was built with)."""

_onednn = False  # torch's own products until set_backend chooses (importing chooses nothing)


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (``vendor_id``, ``cpu family``,
    ``model``, ``model name``, ``flags``, ...); empty where there is no such file."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_vendor() -> str:
    """The CPU's vendor id (``AuthenticAMD``, ``GenuineIntel``, ...), or '' if unknown."""
    return cpu_info().get("vendor_id", "")


def check_backend(name: str) -> None:
    """Raise ValueError naming the choices unless ``name`` is one of ``BACKENDS``."""
    if name not in BACKENDS:
        raise ValueError(f"cpu_matmul must be one of {BACKENDS}, not {name!r}")


def resolve_backend(name: str) -> str:
    """The backend ``set_backend(name)`` would put in effect on this machine, without
    setting it.

    Arguments:
      name (str): one of ``BACKENDS``.

    Returns:
      (str): ``onednn`` or ``torch``; ``onednn`` falls back to torch where this torch
        has no oneDNN.
    """
    check_backend(name)
    if name == "auto":
        name = "onednn" if cpu_vendor() == "AuthenticAMD" else "torch"
    return "onednn" if name == "onednn" and torch.backends.mkldnn.is_available() else "torch"


def set_backend(name: str) -> str:
    """Use backend ``name`` (one of ``BACKENDS``) for ``linear`` on CPUs from now on;
    returns the one in effect (``resolve_backend``: ``onednn`` or ``torch``)."""
    global _onednn
    _onednn = resolve_backend(name) == "onednn"
    return backend()


def backend() -> str:
    """The backend ``linear`` uses on CPUs: ``onednn`` or ``torch``."""
    return "onednn" if _onednn else "torch"


def _on_onednn(x: Tensor) -> bool:
    """Whether products with ``x`` go through oneDNN: float32 on a CPU, that backend on,
    autograd off (the oneDNN op has no gradient), CPU autocast off (autocast does not
    cast the oneDNN op, so a bfloat16 encoder would stay float32 there)."""
    return (
        _onednn
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


def _plain(weight: Tensor) -> bool:
    """Whether a 2-D ``weight`` is contiguous or the transpose of a contiguous matrix:
    oneDNN runs other layouts (rows strided past their length) with a reference kernel,
    orders of magnitude slower than its optimised ones."""
    return weight.is_contiguous() or weight.t().is_contiguous()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` (``F.linear``) for ...xK ``x``, NxK ``weight`` and N ``bias``;
    through oneDNN where ``backend`` says so and ``weight`` is contiguous or a transposed
    view of a contiguous matrix (any ``x``)."""
    if _on_onednn(x) and _plain(weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN's float32 product (CPU tensors, no autograd),
    whatever the backend."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def bmm(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for BxKxN ``left`` and BxNxM ``right``; through oneDNN, one product
    per batch entry, where ``backend`` says so (and ``linear`` would take each ``right``)."""
    if _on_onednn(left):
        return torch.stack([linear(a, b.t()) for a, b in zip(left, right)])
    return torch.bmm(left, right)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` whose product goes through ``linear`` (same parameters and
    state dict keys)."""

    @classmethod
    def from_linear(cls, module: torch.nn.Linear) -> Linear:
        """A ``Linear`` that holds ``module``'s own weight and bias (the same Parameter
        objects, not copies), in its training mode.

        Arguments:
          module (torch.nn.Linear): the layer to stand in for.

        Returns:
          (Linear): the layer, its product through ``linear``.
        """
        # Built on the meta device: its own parameters are replaced at once, so none are
        # allocated or initialised.
        new = cls(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        """...xK inputs to ...xN outputs, as ``torch.nn.Linear.forward``."""
        return linear(x, self.weight, self.bias)
