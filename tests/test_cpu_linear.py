"""oneDNN linear layers (cpu_linear.py) against a float64 reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opd_cli import cpu_linear
from opd_cli.cpu_linear import MIN_WORK, OneDNNLinear, linear, use_onednn

pytestmark = pytest.mark.skipif(
    not cpu_linear.wanted("onednn", nn.Linear(2, 2)), reason="this torch build has no oneDNN linear"
)


def marked(weight: torch.Tensor) -> torch.Tensor:
    weight._opd_onednn = True
    return weight


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """float32 against float64: within 1e-5 of the reference's scale."""
    assert a.shape == b.shape
    assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


# the weight gradient by oneDNN both ways round (wider output, wider input), and by MKL (small weight)
@pytest.mark.parametrize("in_features,out_features", [(128, 512), (512, 128), (128, 96)])
@pytest.mark.parametrize("lead", [(600,), (3, 200)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_gradients_match_float64(in_features, out_features, lead, bias):
    torch.manual_seed(0)
    x = torch.randn(*lead, in_features, requires_grad=True)
    w = marked(nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5))
    b = nn.Parameter(torch.randn(out_features)) if bias else None
    dy = torch.randn(*lead, out_features)
    assert x[..., 0].numel() * w.numel() >= MIN_WORK  # oneDNN's path, not F.linear's
    y = linear(x, w, b)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y_ref = F.linear(*ref)
    y_ref.backward(dy.double())
    close(y, y_ref)
    for t, r in zip([x, w] + ([b] if bias else []), ref, strict=True):
        close(t.grad, r.grad)


def test_oneDNN_path_is_taken_and_small_products_stay_with_blas(monkeypatch):
    calls = []
    real = cpu_linear._product
    monkeypatch.setattr(cpu_linear, "_product", lambda *a: calls.append(a[0].shape) or real(*a))
    w = marked(torch.randn(128, 128))
    small, large = torch.randn(64, 128), torch.randn(256, 128)
    assert torch.equal(linear(small, w), F.linear(small, w))  # 64 x 128 x 128 < MIN_WORK
    linear(large, w)
    assert calls == [large.shape]
    linear(large, torch.randn(128, 128))  # an unmarked weight: F.linear
    assert calls == [large.shape]


def tiny_model(dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).to(dtype)


def test_use_onednn_keeps_parameters_and_the_models_gradients():
    model = tiny_model()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    use_onednn(model, "onednn")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert list(model.state_dict()) == keys  # checkpoints do not change
    ids = torch.randint(0, 300, (4, 40))
    for m in (model, plain):
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max(), name


def test_blas_and_non_float32_models_keep_nn_linear():
    for model, choice in ((tiny_model(), "blas"), (tiny_model(torch.float64), "onednn")):
        use_onednn(model, choice)
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
