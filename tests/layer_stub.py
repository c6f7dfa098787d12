"""A stand-in for the adapters' layer structure, computed independently in numpy.

:func:`layered` builds the same small network on torch or JAX from a list of
ops, wraps it, and returns a :class:`LayeredModel`: the wrapped model plus the
:class:`influx.layers.LayerStructured` capability (``layers``,
``layer_batch``), whose inputs and output gradients come from a float64 numpy
forward and backward pass on the model's own ``theta``. Nothing of the
adapters' layer code (other branches) is used, so the core's layer-wise code
is tested against the flat per-sample gradients of the real adapters.

Ops: ``("linear", W [out, in], b [out] | None)``, ``("conv1d", W [c_out, c_in,
k], b [c_out])`` (stride 1, no padding), ``("tanh",)``, ``("flatten",)`` and
``("scale", s [d])`` (an elementwise learnable scale: a parameter in no layer,
the *rest*). Losses: ``"mse"`` (mean over all entries) and
``"cross_entropy"`` (integer labels).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from models import cross_entropy_loss, mse_loss, to_numpy

import influx
from influx.layers import Layer, LayerBatch, rest_index

Op = tuple[Any, ...]


def torch_network(ops: list[Op], dtype: str) -> Any:
    import torch

    class Scale(torch.nn.Module):
        def __init__(self, values: np.ndarray) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(
                torch.as_tensor(values, dtype=getattr(torch, dtype))
            )

        def forward(self, h: Any) -> Any:
            return h * self.scale

    modules: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind in ("linear", "conv1d"):
            w, b = op[1], op[2]
            if kind == "linear":
                module = torch.nn.Linear(
                    w.shape[1],
                    w.shape[0],
                    bias=b is not None,
                    dtype=getattr(torch, dtype),
                )
            else:
                module = torch.nn.Conv1d(
                    w.shape[1], w.shape[0], w.shape[2], dtype=getattr(torch, dtype)
                )
            with torch.no_grad():
                module.weight.copy_(torch.as_tensor(w))
                if b is not None:
                    module.bias.copy_(torch.as_tensor(b))
            modules.append(module)
        elif kind == "tanh":
            modules.append(torch.nn.Tanh())
        elif kind == "flatten":
            modules.append(torch.nn.Flatten())
        elif kind == "scale":
            modules.append(Scale(op[1]))
    return torch.nn.Sequential(*modules)


def jax_network(ops: list[Op], dtype: str) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    params: list[dict[str, Any]] = []
    for op in ops:
        if op[0] in ("linear", "conv1d"):
            entry = {"w": jnp.asarray(op[1], dtype=dtype)}
            if op[2] is not None:
                entry["b"] = jnp.asarray(op[2], dtype=dtype)
            params.append(entry)
        elif op[0] == "scale":
            params.append({"s": jnp.asarray(op[1], dtype=dtype)})
        else:
            params.append({})

    def apply_fn(p: Any, x: Any) -> Any:
        h = x
        for op, entry in zip(ops, p, strict=True):
            kind = op[0]
            if kind == "linear":
                h = h @ entry["w"].T + (entry["b"] if "b" in entry else 0.0)
            elif kind == "conv1d":
                h = jax.lax.conv_general_dilated(
                    h,
                    entry["w"],
                    (1,),
                    "VALID",
                    dimension_numbers=("NCH", "OIH", "NCH"),
                )
                h = h + entry["b"][None, :, None]
            elif kind == "tanh":
                h = jnp.tanh(h)
            elif kind == "flatten":
                h = h.reshape(h.shape[0], -1)
            elif kind == "scale":
                h = h * entry["s"]
        return h

    return apply_fn, params


def _names(backend_name: str, index: int) -> dict[str, str]:
    if backend_name == "torch":
        return {"w": f"{index}.weight", "b": f"{index}.bias", "s": f"{index}.scale"}
    return {"w": f"[{index}]['w']", "b": f"[{index}]['b']", "s": f"[{index}]['s']"}


class Forwarding:
    """The :class:`influx.TwiceDifferentiable` members of ``self._model``, spelt out.

    Python 3.12+ checks runtime protocols with ``inspect.getattr_static``,
    which does not see attributes that ``__getattr__`` provides, so a test
    wrapper forwarding by ``__getattr__`` alone is no longer a wrapped model.
    """

    _model: Any

    @property
    def backend(self) -> Any:
        return self._model.backend

    @property
    def num_params(self) -> int:
        return self._model.num_params

    @property
    def dtype(self) -> Any:
        return self._model.dtype

    @property
    def parameters(self) -> Any:
        return self._model.parameters

    def per_sample_grads(self, x: Any, y: Any) -> Any:
        return self._model.per_sample_grads(x, y)

    def hvp(self, x: Any, y: Any, vectors: Any) -> Any:
        return self._model.hvp(x, y, vectors)

    def mixed_grads(self, x: Any, y: Any, vectors: Any) -> Any:
        return self._model.mixed_grads(x, y, vectors)


class LayeredModel(Forwarding):
    """A wrapped model plus a numpy-computed layer structure (see the module)."""

    def __init__(self, model: Any, ops: list[Op], backend_name: str, loss: str):
        self._model, self._ops, self._loss_kind = model, ops, loss
        offsets, start = {}, 0
        for name, size in model.parameter_blocks:
            offsets[name] = (start, int(size))
            start += int(size)
        self._slots: list[dict[str, np.ndarray]] = []
        layers = []
        for index, op in enumerate(ops):
            names = _names(backend_name, index)
            slots = {}
            for key, name in names.items():
                if name in offsets:
                    begin, size = offsets[name]
                    slots[key] = np.arange(begin, begin + size, dtype=np.int64)
            self._slots.append(slots)
            if op[0] in ("linear", "conv1d"):
                d_out = op[1].shape[0]
                weight = slots["w"].reshape(d_out, -1)
                layers.append(Layer(f"layer{index}", op[0], weight, slots.get("b")))
        self._layers = layers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    @property
    def layers(self) -> list[Layer]:
        return list(self._layers)

    def _weights(self) -> np.ndarray:
        return to_numpy(self._model.parameters)

    def layer_batch(
        self, x: Any, y: Any, *, fisher: str = "empirical", noise: Any = None
    ) -> LayerBatch:
        assert fisher == "empirical"
        theta = self._weights()
        h = to_numpy(x)
        records: list[Any] = []
        for op, slots in zip(self._ops, self._slots, strict=True):
            kind = op[0]
            records.append(h)
            if kind == "linear":
                w = theta[slots["w"]].reshape(op[1].shape)
                h = h @ w.T + (theta[slots["b"]] if "b" in slots else 0.0)
            elif kind == "conv1d":
                w = theta[slots["w"]].reshape(op[1].shape)
                patches = _patches(h, w.shape[2])  # [B, T, c_in * k]
                h = patches @ w.reshape(w.shape[0], -1).T + theta[slots["b"]]
                h = h.transpose(0, 2, 1)
            elif kind == "tanh":
                h = np.tanh(h)
            elif kind == "flatten":
                h = h.reshape(h.shape[0], -1)
            elif kind == "scale":
                h = h * theta[slots["s"]]
        count = h.shape[0]
        if self._loss_kind == "mse":
            target = to_numpy(y).reshape(h.shape)
            losses = np.mean((h - target) ** 2, axis=1)
            grad = 2 * (h - target) / h.shape[1]
        else:
            labels = to_numpy(y).astype(np.int64)
            shifted = h - h.max(axis=1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            losses = -log_p[np.arange(count), labels]
            grad = np.exp(log_p)
            grad[np.arange(count), labels] -= 1.0
        flat = np.zeros((count, theta.size))
        inputs, outputs = [], []
        for op, slots, h_in in reversed(
            list(zip(self._ops, self._slots, records, strict=True))
        ):
            kind = op[0]
            if kind == "linear":
                w = theta[slots["w"]].reshape(op[1].shape)
                inputs.append(h_in[:, None, :])
                outputs.append(grad[:, None, None, :])
                grad = grad @ w
            elif kind == "conv1d":
                w = theta[slots["w"]].reshape(op[1].shape)
                c_out, c_in, width = w.shape
                inputs.append(_patches(h_in, width))
                g = grad.transpose(0, 2, 1)  # [B, T, c_out]
                outputs.append(g[:, None])
                patch_grads = (g @ w.reshape(c_out, -1)).reshape(count, -1, c_in, width)
                grad = np.zeros_like(h_in)
                for k in range(width):
                    grad[:, :, k : k + patch_grads.shape[1]] += patch_grads[
                        :, :, :, k
                    ].transpose(0, 2, 1)
            elif kind == "tanh":
                grad = grad * (1.0 - np.tanh(h_in) ** 2)
            elif kind == "flatten":
                grad = grad.reshape(h_in.shape)
            elif kind == "scale":
                flat[:, slots["s"]] = grad * h_in
                grad = grad * theta[slots["s"]]
        inputs.reverse()
        outputs.reverse()
        rest = flat[:, rest_index(self._layers, theta.size)][:, None, :]
        backend, like = self._model.backend, self._model.parameters

        def native(array: np.ndarray) -> Any:
            return backend.asarray(np.ascontiguousarray(array), like=like)

        return LayerBatch(
            tuple(native(a) for a in inputs),
            tuple(native(g) for g in outputs),
            native(rest),
            native(losses),
        )


def _patches(h: np.ndarray, width: int) -> np.ndarray:
    """``[B, c_in, L]`` -> ``[B, T, c_in * width]``, entry ``(c, k)`` of position ``t``
    is ``h[:, c, t + k]``."""
    positions = h.shape[2] - width + 1
    windows = np.stack([h[:, :, k : k + positions] for k in range(width)], axis=-1)
    return windows.transpose(0, 2, 1, 3).reshape(h.shape[0], positions, -1)


def layered(
    backend_name: str, ops: list[Op], loss: str = "mse", dtype: str = "float64"
) -> LayeredModel:
    """The network of ``ops`` wrapped on ``backend_name``, with layer structure."""
    loss_fn = (
        mse_loss(backend_name) if loss == "mse" else cross_entropy_loss(backend_name)
    )
    if backend_name == "torch":
        wrapped = influx.twice_differentiable(torch_network(ops, dtype), loss_fn)
    else:
        apply_fn, params = jax_network(ops, dtype)
        wrapped = influx.twice_differentiable(apply_fn, loss_fn, params=params)
    return LayeredModel(wrapped, ops, backend_name, loss)


def mlp_ops(sizes: tuple[int, ...], seed: int = 0, scale: bool = False) -> list[Op]:
    """A tanh MLP; with ``scale``, a learnable elementwise scale on its output."""
    rng = np.random.default_rng(seed)
    ops: list[Op] = []
    for index, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        ops.append(("linear", w, 0.1 * rng.standard_normal(n_out)))
        if index < len(sizes) - 2:
            ops.append(("tanh",))
    if scale:
        ops.append(("scale", 1.0 + 0.1 * rng.standard_normal(sizes[-1])))
    return ops


#: Input channels and length of :func:`cnn_ops`' inputs ``[B, 2, 7]``.
CNN_INPUT = (2, 7)


def cnn_ops(
    channels: int = 2, width: int = 3, outputs: int = 3, seed: int = 0
) -> list[Op]:
    """conv1d(2 -> channels) - tanh - flatten - linear; inputs ``[B, 2, 7]``."""
    rng = np.random.default_rng(seed)
    c_in, length = CNN_INPUT
    positions = length - width + 1
    conv = rng.standard_normal((channels, c_in, width)) / np.sqrt(c_in * width)
    dense = rng.standard_normal((outputs, channels * positions)) / np.sqrt(
        channels * positions
    )
    return [
        ("conv1d", conv, 0.1 * rng.standard_normal(channels)),
        ("tanh",),
        ("flatten",),
        ("linear", dense, 0.1 * rng.standard_normal(outputs)),
    ]


def native_grads(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample gradients ``[B, P]`` from the adapter (flat), float64 numpy."""
    backend, theta = model.backend, model.parameters
    x, y = backend.asarray(x, like=theta), backend.asarray(y)
    return to_numpy(model.per_sample_grads(x, y)[0])


class FlatOnly(Forwarding):
    """A wrapped model without the layer structure (``layers`` hidden).

    Scoring it takes the flat path (per-sample gradients ``[B, P]``), the
    reference for the layer-wise path on the same model.
    """

    HIDDEN = ("layers", "layer_batch", "find_layers")

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        if name in self.HIDDEN:
            raise AttributeError(name)
        return getattr(self._model, name)
