"""The torch adapter's layer structure (influx.layers.LayerStructured).

References: ``flat_gradients`` of a ``layer_batch`` must equal the adapter's
per-sample gradients (``torch.func`` over the whole ``theta``, an independent
code path) to 1e-10 in float64 and 1e-5 (relative) in float32; the probes of
``fisher="ggn"``/``"mc"`` are compared with output-Hessian square roots built
here with numpy from ``torch.func.hessian``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_numpy, torch_mlp

import influx
from influx.errors import InputError
from influx.layers import LayerLayout, flat_gradients, has_layers, rest_index

torch = pytest.importorskip("torch")
nn = torch.nn

B = 5  # an uneven batch size


class Seq(nn.Module):
    """Linear on ``[B, T, d]`` tokens, a reused layer, then a mean and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Any) -> Any:
        h = torch.tanh(self.proj(x))  # [B, T, 4]
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.mix(h))  # the same module, called twice
        return self.head(h.mean(dim=1))


class Normed(nn.Module):
    """Linear, BatchNorm, LayerNorm, a grouped conv and an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)
        self.grouped = nn.Conv1d(2, 2, 2, groups=2)
        self.out = nn.Linear(10, 3, bias=False)

    def forward(self, x: Any) -> Any:
        h = torch.relu_(self.fc(x))  # works in place on the layer's output
        h = self.ln(torch.tanh(self.bn(h)))
        g = torch.tanh(self.grouped(h.reshape(-1, 2, 3)))  # [B, 2, 2]
        return self.out(torch.cat([h, g.flatten(1)], dim=1))


def _cnn() -> Any:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, (2, 3), padding="same", dilation=(1, 2), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.c2 = nn.Conv1d(3, 2, 2, padding="valid")
        self.c3 = nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular")  # rest
        self.out = nn.Linear(6, 2)

    def forward(self, x: Any) -> Any:
        h = torch.tanh(self.c1(x))  # [B, 3, 4] from length 9
        h = torch.tanh(self.c2(h))  # [B, 2, 3]
        h = torch.tanh(self.c3(h))
        return self.out(h.flatten(1))


def _frozen() -> Any:
    net = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)
    )
    net[0].requires_grad_(False)  # a frozen layer
    net[2].bias.requires_grad_(False)  # a layer without its (frozen) bias
    net[4].weight.requires_grad_(False)  # trainable bias only: the rest
    return net


class Tied(nn.Module):
    """An embedding whose weight is tied to the output layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 5)
        self.out.weight = self.emb.weight

    def forward(self, x: Any) -> Any:
        return self.out(torch.tanh(self.mid(self.emb(x).mean(dim=1))))


class Attention(nn.Module):
    """Self-attention (its projections are the rest), a kwargs call, a spare layer."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.spare = nn.Linear(4, 4)  # never called: zero gradients
        self.out = nn.Linear(4, 2)

    def forward(self, x: Any) -> Any:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(input=h.mean(dim=1))


class DirectRead(nn.Module):
    """A layer whose weight the parent reads directly, never calling the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Any) -> Any:
        return torch.nn.functional.linear(x, self.fc.weight)


def _mlp() -> Any:
    return torch_mlp(mlp_weights((3, 5, 4, 2), seed=1), "float64")


def _data(name: str, dtype: Any = torch.float64) -> tuple[Any, Any, Any]:
    """(module, x, y, loss) for ``name``, weights and data seeded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mse = nn.MSELoss()
    ce = nn.CrossEntropyLoss()
    if name == "mlp":
        module, x, y, loss = _mlp(), torch.randn(B, 3, generator=gen), None, mse
        y = torch.randn(B, 2, generator=gen)
    elif name == "mlp_ce":
        module, x, loss = _mlp(), torch.randn(B, 3, generator=gen), ce
        y = torch.randint(0, 2, (B,), generator=gen)
    elif name == "cnn":
        module, x, loss = _cnn(), torch.randn(B, 2, 5, 6, generator=gen), ce
        y = torch.randint(0, 3, (B,), generator=gen)
    elif name == "conv1d":
        module, x, loss = Conv1dNet(), torch.randn(B, 2, 9, generator=gen), mse
        y = torch.randn(B, 2, generator=gen)
    elif name == "normed":
        module, x, loss = Normed(), torch.randn(B, 4, generator=gen), ce
        y = torch.randint(0, 3, (B,), generator=gen)
        with torch.no_grad():  # warm running statistics, then stay in train mode
            module(torch.randn(16, 4, generator=gen, dtype=torch.float32))
    elif name == "seq":
        module, x, loss = Seq(), torch.randn(B, 4, 3, generator=gen), mse
        y = torch.randn(B, 2, generator=gen)
    elif name == "frozen":
        module, x, loss = _frozen(), torch.randn(B, 3, generator=gen), mse
        y = torch.randn(B, 2, generator=gen)
    elif name == "attention":
        module, x, loss = Attention(), torch.randn(B, 3, 4, generator=gen), mse
        y = torch.randn(B, 2, generator=gen)
    elif name == "tied":
        module, x, loss = Tied(), torch.randint(0, 5, (B, 4), generator=gen), ce
        y = torch.randint(0, 5, (B,), generator=gen)
    else:
        raise AssertionError(name)
    module = module.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return module, x, y, loss


MODELS = [
    "mlp",
    "mlp_ce",
    "cnn",
    "conv1d",
    "normed",
    "seq",
    "frozen",
    "tied",
    "attention",
]

#: Expected (layer names, whether each has a bias, P_rest).
STRUCTURE = {
    "mlp": (["0", "2", "4"], [True] * 3, 0),
    "cnn": (["0", "2", "5"], [True, False, True], 0),
    "conv1d": (["c1", "c2", "out"], [True] * 3, 2 * 2 * 3 + 2),
    "normed": (["fc", "out"], [True, False], 4 * 6 + 2 * 1 * 2 + 2),
    "seq": (["proj", "mix", "head"], [True] * 3, 0),
    "frozen": (["2"], [False], 2),
    "tied": (["mid"], [True], 5 * 3 + 5),
    "attention": (["spare", "out"], [True, True], 3 * 4 * 4 + 3 * 4 + 4 * 4 + 4),
}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_layers_found(name: str) -> None:
    module, *_, loss = _data(name)
    model = influx.twice_differentiable(module, loss)
    assert has_layers(model)
    names, biases, rest = STRUCTURE[name]
    layers = model.layers
    assert [layer.name for layer in layers] == names
    assert [layer.has_bias for layer in layers] == biases
    assert rest_index(layers, model.num_params).size == rest
    theta = to_numpy(model.parameters)
    for layer in layers:  # the indices point at the module's own weight, reshaped
        sub = module.get_submodule(layer.name)
        weight = to_numpy(sub.weight.detach()).reshape(layer.d_out, -1)
        np.testing.assert_array_equal(theta[layer.weight_index], weight)
        if layer.has_bias:
            np.testing.assert_array_equal(
                theta[layer.bias_index], to_numpy(sub.bias.detach())
            )
    assert model.layers is not model.layers  # a copy of one cached list
    assert model.layers[0] is layers[0]


def _check_empirical(name: str, dtype: Any, tol: float) -> None:
    module, x, y, loss = _data(name, dtype)
    model = influx.twice_differentiable(module, loss)
    batch = model.layer_batch(x, y)
    layout = LayerLayout(model.layers, model.num_params)
    flat = flat_gradients(layout, batch)
    grads, losses = model.per_sample_grads(x, y)
    assert flat.shape == (B, 1, model.num_params)
    assert flat.dtype == dtype
    scale = float(grads.abs().max())
    assert float((flat[:, 0] - grads).abs().max()) <= tol * scale
    assert float((batch.losses - losses).abs().max()) <= tol * float(losses.abs().max())
    for layer, a, g in zip(model.layers, batch.inputs, batch.output_grads, strict=True):
        assert a.shape[0] == B and a.shape[2] == layer.d_in
        assert g.shape == (B, 1, a.shape[1], layer.d_out)


@pytest.mark.parametrize("name", MODELS)
def test_empirical_equals_per_sample_grads(name: str) -> None:
    _check_empirical(name, torch.float64, 1e-10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "normed", "seq"])
def test_empirical_float32(name: str) -> None:
    _check_empirical(name, torch.float32, 1e-5)


def test_conv_positions() -> None:
    """Conv inputs are the unfolded patches, ``T`` the output positions."""
    module, x, y, loss = _data("cnn")
    batch = influx.twice_differentiable(module, loss).layer_batch(x, y)
    assert batch.inputs[0].shape == (B, 3 * 3, 2 * 3 * 3)  # 5x6 -> 3x3, stride 2
    assert batch.inputs[1].shape == (B, 9, 3 * 2 * 3)  # "same": 3x3 stays
    assert batch.inputs[2].shape == (B, 1, 18)
    # the first layer's patches times its weight give its pre-activations
    conv = module[0]
    pre = batch.inputs[0] @ conv.weight.detach().reshape(3, -1).T + conv.bias.detach()
    expected = conv(x).detach().flatten(2).transpose(1, 2)
    torch.testing.assert_close(pre, expected, rtol=0, atol=1e-12)


def test_integer_inputs_cast() -> None:
    """A model without embeddings casts integer inputs, as per_sample_grads."""
    module, x, y, loss = _data("mlp")
    model = influx.twice_differentiable(module, loss)
    xi = (3 * x).round().to(torch.int64)
    flat = flat_gradients(
        LayerLayout(model.layers, model.num_params), model.layer_batch(xi, y)
    )
    grads, _ = model.per_sample_grads(xi, y)
    assert float((flat[:, 0] - grads).abs().max()) <= 1e-10 * float(grads.abs().max())


def test_uncalled_layer_has_zero_gradients() -> None:
    module, x, y, loss = _data("attention")
    batch = influx.twice_differentiable(module, loss).layer_batch(x, y, fisher="ggn")
    assert batch.inputs[0].shape == (B, 1, 4)
    assert batch.output_grads[0].shape == (B, 2, 1, 4)
    assert not batch.output_grads[0].any()


def test_weight_read_directly_is_an_error() -> None:
    model = influx.twice_differentiable(DirectRead().double(), nn.MSELoss())
    assert [layer.name for layer in model.layers] == ["fc"]
    x, y = (
        torch.randn(B, 3, dtype=torch.float64),
        torch.randn(B, 2, dtype=torch.float64),
    )
    with pytest.raises(InputError, match=r"'fc' was not called.*reads it directly"):
        model.layer_batch(x, y)
    assert not model.model.fc._forward_hooks


def test_bad_arguments() -> None:
    module, x, y, loss = _data("mlp")
    model = influx.twice_differentiable(module, loss)
    with pytest.raises(InputError, match="fisher"):
        model.layer_batch(x, y, fisher="kfac")
    with pytest.raises(InputError, match="noise"):
        model.layer_batch(x, y, fisher="mc")
    with pytest.raises(InputError, match="noise"):
        model.layer_batch(x, y, fisher="mc", noise=lambda b, c: np.zeros((b, c)))


def test_too_many_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    import influx_torch._layers as torch_layers

    monkeypatch.setattr(torch_layers, "MAX_OUTPUT_HESSIAN", 1)
    module, x, y, loss = _data("mlp")
    model = influx.twice_differentiable(module, loss)
    with pytest.raises(InputError, match=r"fisher='ggn'.*C=2"):
        model.layer_batch(x, y, fisher="ggn")
    model.layer_batch(x, y)  # empirical needs no output Hessian


# -- the module is left as it was ---------------------------------------------------


def _state(module: Any) -> list[Any]:
    return [
        [
            (n, p.detach().clone(), p.requires_grad, p.grad)
            for n, p in module.named_parameters()
        ],
        [(n, b.clone()) for n, b in module.named_buffers()],
        [
            (n, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for n, m in module.named_modules()
        ],
    ]


def _assert_same(before: list[Any], after: list[Any]) -> None:
    for (n1, p1, r1, g1), (n2, p2, r2, g2) in zip(before[0], after[0], strict=True):
        assert n1 == n2 and r1 == r2 and g1 is None and g2 is None
        assert torch.equal(p1, p2)
    for (n1, b1), (n2, b2) in zip(before[1], after[1], strict=True):
        assert n1 == n2 and torch.equal(b1, b2)
    assert before[2] == after[2]
    assert all(not hooks for _, _, hooks, _ in after[2])


@pytest.mark.parametrize("fisher", ["empirical", "ggn", "mc"])
def test_module_unchanged(fisher: str) -> None:
    module, x, y, loss = _data("normed")
    module.train()
    module.out.eval()
    before = _state(module)
    model = influx.twice_differentiable(module, loss)
    noise = lambda b, c: np.ones((b, 2, c))  # noqa: E731
    model.layer_batch(x, y, fisher=fisher, noise=noise)
    model.ggnvp(x, y, torch.ones(2, model.num_params, dtype=torch.float64))
    _assert_same(before, _state(module))


def test_module_unchanged_when_loss_raises() -> None:
    module, x, y, _ = _data("normed")
    module.train()
    before = _state(module)

    def bad_loss(pred: Any, target: Any) -> Any:
        raise RuntimeError("loss failed")

    model = influx.twice_differentiable(module, bad_loss)
    for fisher in ("empirical", "ggn"):
        with pytest.raises(RuntimeError, match="loss failed"):
            model.layer_batch(x, y, fisher=fisher)
    with pytest.raises(RuntimeError, match="loss failed"):
        model.ggnvp(x, y, torch.ones(1, model.num_params, dtype=torch.float64))
    _assert_same(before, _state(module))


def test_module_unchanged_when_forward_raises() -> None:
    module, x, y, loss = _data("mlp")
    before = _state(module)
    model = influx.twice_differentiable(module, loss)
    with pytest.raises(RuntimeError):
        model.layer_batch(x[:, :2], y)  # wrong input width
    _assert_same(before, _state(module))


# -- ggn probes on convolutions and rest parameters --------------------------------


def _dense_ggn(model: Any, x: Any, y: Any) -> np.ndarray:
    """``J^T H_out J`` from ``jacrev`` of the outputs and ``hessian`` of the loss."""
    from torch.func import functional_call, hessian, jacrev

    def outputs(theta: Any) -> Any:
        params = {**model._constants, **model._unflatten(theta)}
        return functional_call(model.model, params, (x,))

    with model._eval_mode():
        predictions = outputs(model.parameters).detach()
        jac = to_numpy(jacrev(outputs)(model.parameters))
        h_out = to_numpy(hessian(lambda f: model.loss(f, y))(predictions))
    size = predictions.numel()
    jac = jac.reshape(size, -1)
    return jac.T @ h_out.reshape(size, size) @ jac


@pytest.mark.parametrize("name", ["cnn", "conv1d", "normed", "seq"])
def test_ggn_probes_equal_dense_ggn(name: str) -> None:
    """``(1/B) sum_n sum_s`` of the probes' gradient outer products is the GGN."""
    module, x, y, loss = _data(name)
    model = influx.twice_differentiable(module, loss)
    batch = model.layer_batch(x, y, fisher="ggn")
    flat = to_numpy(flat_gradients(LayerLayout(model.layers, model.num_params), batch))
    probe_ggn = np.einsum("nsp,nsq->pq", flat, flat) / B
    dense = _dense_ggn(model, x, y)
    assert np.abs(probe_ggn - dense).max() <= 1e-10 * np.abs(dense).max()
    vectors = np.random.default_rng(0).standard_normal((2, model.num_params))
    products = to_numpy(model.ggnvp(x, y, torch.as_tensor(vectors)))
    expected = vectors @ dense
    assert np.abs(products - expected).max() <= 1e-10 * np.abs(expected).max()


class _Square(torch.autograd.Function):
    """``x^2`` with a backward and a vmap rule but no forward-mode (jvp) rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Any) -> Any:
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _NoForwardMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: Any) -> Any:
        return self.b(_Square.apply(self.a(x)))


def test_ggnvp_without_forward_mode_rule() -> None:
    """``J v`` falls back to reverse over reverse; the result is the same."""
    model = influx.twice_differentiable(_NoForwardMode().double(), nn.MSELoss())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(B, 2, generator=gen, dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # the path the fallback replaces
        torch.func.jvp(_Square.apply, (x,), (x,))
    vectors = np.random.default_rng(1).standard_normal((2, model.num_params))
    products = to_numpy(model.ggnvp(x, y, torch.as_tensor(vectors)))
    expected = vectors @ _dense_ggn(model, x, y)
    assert np.abs(products - expected).max() <= 1e-10 * np.abs(expected).max()


def test_probes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes back-propagated a few at a time give the same output gradients."""
    import influx_torch._layers as torch_layers

    module, x, y, loss = _data("cnn")
    model = influx.twice_differentiable(module, loss)
    whole = model.layer_batch(x, y, fisher="ggn")  # S = 3 in one pass
    monkeypatch.setattr(torch_layers, "PROBE_CHUNK", 2)
    chunked = model.layer_batch(x, y, fisher="ggn")
    for a, b in zip(whole.output_grads, chunked.output_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_under_no_grad_and_threads() -> None:
    """No-grad mode of the caller and concurrent calls change nothing."""
    import threading

    module, x, y, loss = _data("normed")
    model = influx.twice_differentiable(module, loss)
    reference = model.layer_batch(x, y, fisher="ggn")
    with torch.no_grad():
        quiet = model.layer_batch(x, y, fisher="ggn")
    results: list[Any] = []

    def work() -> None:
        results.append(model.layer_batch(x, y, fisher="ggn"))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for batch in [quiet, *results]:
        for a, b in zip(batch.output_grads, reference.output_grads, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(batch.rest_grads, reference.rest_grads)
    assert not any(m._forward_hooks for m in module.modules())


class _FirstPointOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Any) -> Any:
        return x[:, :2] + self.fc(x[0])  # the layer sees one point, not the batch


def test_layer_off_the_batch_is_an_error() -> None:
    model = influx.twice_differentiable(_FirstPointOnly().double(), nn.MSELoss())
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"layer 'fc' got inputs of shape \(3,\)"):
        model.layer_batch(x, x[:, :2])
    assert not model.model.fc._forward_hooks
