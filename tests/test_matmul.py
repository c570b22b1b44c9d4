"""samserve.matmul: the same products through oneDNN or torch, chosen once per process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from profile_decoder import OpTimes
from samserve import matmul
from samserve.decoder import predict_masks
from samserve.models import assemble_sam, spec_by_name, swap_modules
from samserve.settings import Settings

ONEDNN = torch.backends.mkldnn.is_available()
BACKENDS = ["torch"] + (["onednn"] if ONEDNN else [])


class OpNames(OpTimes):
    """The profiler's op timer, asked only which ops ran."""

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.calls}


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_and_bmm_are_torchs_products(backend):
    assert matmul.set_backend(backend) == backend
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=generator)
    weight = torch.randn(64, 48, generator=generator).t()  # 48x64, a transposed view
    bias = torch.randn(48, generator=generator)
    right = torch.randn(3, 64, 40, generator=generator).transpose(1, 2).contiguous().transpose(1, 2)
    with torch.inference_mode():
        torch.testing.assert_close(matmul.linear(x, weight, bias), F.linear(x, weight, bias))
        torch.testing.assert_close(matmul.linear(x[0], weight), x[0] @ weight.t())
        torch.testing.assert_close(matmul.bmm(x, right), torch.bmm(x, right))


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
def test_onednn_backend_runs_onednns_op_and_torch_backend_does_not():
    x, weight = torch.randn(20, 16), torch.randn(8, 16)
    for backend, expected in (("onednn", "_linear_pointwise"), ("torch", "linear")):
        matmul.set_backend(backend)
        with torch.inference_mode(), OpNames() as ops:
            matmul.linear(x, weight)
        assert expected in ops.names, (backend, ops.names)
        assert ("_linear_pointwise" in ops.names) == (backend == "onednn")


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
def test_weights_with_strided_rows_stay_on_torch():
    """oneDNN multiplies such weights with a reference kernel, 1000x slower."""
    matmul.set_backend("onednn")
    x = torch.randn(6, 16)
    strided = torch.randn(8, 32)[:, :16]  # rows 32 apart
    with torch.inference_mode(), OpNames() as ops:
        out = matmul.linear(x, strided)
        matmul.linear(x, strided.contiguous().t().contiguous().t())  # a transposed view: fine
    assert ops.names >= {"linear", "_linear_pointwise"}
    torch.testing.assert_close(out, x @ strided.t())


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
def test_products_under_cpu_autocast_stay_on_torch_and_are_cast():
    """Autocast does not cast oneDNN's op: a bfloat16 encoder must not stay float32."""
    matmul.set_backend("onednn")
    x, weight = torch.randn(6, 16), torch.randn(8, 16)
    with torch.inference_mode(), OpNames() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = matmul.linear(x, weight)
        plain = matmul.linear(x, weight)
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert sum(name == "_linear_pointwise" for name, _ in ops.calls) == 1  # the plain one


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
def test_products_with_autograd_stay_on_torch_and_have_gradients():
    matmul.set_backend("onednn")
    x = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)
    with OpNames() as ops:
        out = matmul.linear(x, weight)
    assert "_linear_pointwise" not in ops.names
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(5, -1))


def test_auto_picks_onednn_on_amd_only(monkeypatch):
    for vendor, expected in (("AuthenticAMD", "onednn"), ("GenuineIntel", "torch"), ("", "torch")):
        monkeypatch.setattr(matmul, "cpu_vendor", lambda vendor=vendor: vendor)
        assert matmul.set_backend("auto") == (expected if ONEDNN else "torch")
        assert matmul.backend() == matmul.set_backend("auto")


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="cpu_matmul must be one of"):
        matmul.set_backend("blas")
    with pytest.raises(ValueError, match="cpu_matmul must be one of"):
        Settings.from_dict({"cpu_matmul": "mkl"})
    assert Settings.from_dict({"cpu_matmul": "torch"}).cpu_matmul == "torch"


def test_linears_swapped_hold_the_same_parameters_and_answer_the_same():
    torch.manual_seed(0)
    sam = assemble_sam(spec_by_name("sam_micro")).eval()
    linears = {name: m for name, m in sam.named_modules() if type(m) is torch.nn.Linear}
    keys = list(sam.state_dict())
    name, first = next(iter(linears.items()))
    x = torch.randn(2, 7, first.in_features)
    with torch.inference_mode():
        expected = first(x)
    assert swap_modules(sam, torch.nn.Linear, matmul.Linear.from_linear) == len(linears) > 0
    swapped = dict(sam.named_modules())
    for key, old in linears.items():
        new = swapped[key]
        assert type(new) is matmul.Linear and new is not old and not new.training
        assert new.weight is old.weight and new.bias is old.bias
    assert list(sam.state_dict()) == keys
    assert swap_modules(sam, torch.nn.Linear, matmul.Linear.from_linear) == 0  # already routed
    for backend in BACKENDS:
        matmul.set_backend(backend)
        with torch.inference_mode():
            torch.testing.assert_close(swapped[name](x), expected)


def test_a_linear_without_bias_swaps_too():
    plain = torch.nn.Linear(6, 4, bias=False)
    routed = matmul.Linear.from_linear(plain)
    assert routed.bias is None and routed.weight is plain.weight and routed.training
    x = torch.randn(3, 6)
    with torch.inference_mode():
        torch.testing.assert_close(routed(x), plain(x))


def test_importing_chooses_no_backend_and_resolving_sets_none(monkeypatch):
    """Until something sets it, products are torch's; ``resolve_backend`` only answers."""
    monkeypatch.setattr(matmul, "_onednn", False)  # as a fresh import leaves it
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: "AuthenticAMD")
    assert matmul.backend() == "torch"
    assert matmul.resolve_backend("auto") == ("onednn" if ONEDNN else "torch")
    assert matmul.resolve_backend("torch") == "torch"
    assert matmul.backend() == "torch"


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN")
def test_decoder_products_go_through_the_chosen_backend():
    torch.manual_seed(0)
    sam = assemble_sam(spec_by_name("sam_micro")).eval()
    prompts = sam.prompt_encoder
    embedding = torch.randn(1, prompts.embed_dim, *prompts.image_embedding_size)
    points = (torch.rand(2, 1, 2) * sam.image_encoder.img_size, torch.ones(2, 1))
    sparse, dense = prompts(points=points, boxes=None, masks=None)
    results = {}
    for backend in ("torch", "onednn"):
        matmul.set_backend(backend)
        with torch.inference_mode(), OpNames() as ops:
            results[backend] = predict_masks(
                sam.mask_decoder, embedding, prompts.get_dense_pe(), sparse, dense
            )[0]
        assert ("_linear_pointwise" in ops.names) == (backend == "onednn")
    torch.testing.assert_close(results["onednn"], results["torch"], atol=2e-5, rtol=1e-4)
