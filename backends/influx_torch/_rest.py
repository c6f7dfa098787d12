"""Per-sample gradients of the rest parameters (those in no recognised layer).

Most rest parameters belong to a *leaf* module (one without submodules) that
works on the batch point by point: normalisation layers in evaluation mode,
embeddings, grouped convolutions. During the batched forward of
:func:`influx_torch._layers.layer_batch` a hook re-runs each call of such a
module point by point (``vmap`` over the batch, each point a batch of one) with
its rest parameters replaced by per-sample copies ``[B, *shape]`` (an expanded
view, no copy): the gradient with respect to the copies is every point's own
gradient, out of the same reverse pass that gives the layers' output gradients.

Parameters that do not fit (owned by a module with submodules, shared by
several modules, or a call whose inputs or outputs are not batch-first) take a
second pass: ``vmap`` over the points of a per-sample ``vjp`` of the whole
model with respect to those parameters alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["RestModule", "RestRecord", "generic_rest_grads", "per_sample_calls"]


class RestModule(NamedTuple):
    """A leaf module and its rest parameters: ``(attribute, name in theta)``."""

    module: torch.nn.Module
    params: list[tuple[str, str]]


class RestRecord(NamedTuple):
    """Per module: the per-sample copies of each call, or ``handled=False``."""

    calls: list[dict[str, torch.Tensor]]
    handled: list[bool]


def _batch_first(tensors: list[Any], batch: int) -> bool:
    return all(
        not isinstance(t, torch.Tensor) or (t.ndim >= 1 and t.shape[0] == batch)
        for t in tensors
    )


@contextlib.contextmanager
def per_sample_calls(
    rest_modules: list[RestModule], batch: int
) -> Iterator[RestRecord]:
    """Hooks on the rest modules for the duration of one batched forward.

    Yields a :class:`RestRecord`: ``calls[i]`` lists, per call of module ``i``,
    its per-sample parameter copies ``{name in theta: [B, *shape]}``;
    ``handled[i]`` is False if a call could not be re-run point by point (its
    parameters then need :func:`generic_rest_grads`). The hooks are removed on
    exit, also when the forward raises.
    """
    record = RestRecord([[] for _ in rest_modules], [True] * len(rest_modules))
    inside = [False]  # the hook's own point-by-point call runs the module again

    def hook_for(index: int) -> Callable[..., Any]:
        params = rest_modules[index].params

        def hook(sub: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if inside[0]:
                return None
            flat, spec = tree_flatten((args, kwargs))
            batched = [
                isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == batch
                for t in flat
            ]
            if not any(batched) or not _batch_first(tree_flatten(output)[0], batch):
                record.handled[index] = False
                return None
            copies = {
                attr: getattr(sub, attr)
                .detach()
                .expand(batch, *getattr(sub, attr).shape)
                for attr, _ in params
            }
            copies = {attr: c.requires_grad_() for attr, c in copies.items()}

            def one_point(values: dict[str, torch.Tensor], *point: Any) -> Any:
                point_flat = [
                    t.unsqueeze(0) if b else t
                    for t, b in zip(point, batched, strict=True)
                ]
                a, k = tree_unflatten(point_flat, spec)
                result = functional_call(sub, values, tuple(a), dict(k))
                return tree_map(
                    lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, result
                )

            dims = (0, *[0 if b else None for b in batched])
            inside[0] = True
            try:
                new_output = vmap(one_point, in_dims=dims)(copies, *flat)
            finally:
                inside[0] = False
            record.calls[index].append({name: copies[attr] for attr, name in params})
            return new_output

        return hook

    handles = []
    try:
        for index, rest in enumerate(rest_modules):
            handles.append(
                rest.module.register_forward_hook(hook_for(index), with_kwargs=True)
            )
        yield record
    finally:
        for handle in handles:
            handle.remove()


def generic_rest_grads(
    wrapped: Any, names: list[str], x: Any, probes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{name: [B, S, size]}``: the probes pulled back to parameters ``names``.

    ``vmap`` over the points of a per-sample ``vjp`` of the model's outputs
    with respect to those parameters, itself mapped over the ``S`` probes.
    """
    num_probes = int(probes.shape[1])
    params = {**wrapped._constants, **wrapped._unflatten(wrapped._theta)}
    chosen = {name: params.pop(name) for name in names}

    def sample_outputs(values: dict[str, torch.Tensor], xn: Any) -> torch.Tensor:
        out = functional_call(wrapped.model, {**params, **values}, (xn.unsqueeze(0),))
        return out.reshape(-1)

    def one_point(xn: Any, un: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pullback = vjp(lambda values: sample_outputs(values, xn), chosen)
        pulled = vmap(pullback)(un)[0]  # name -> [S, *shape]
        return {name: pulled[name].reshape(num_probes, -1) for name in names}

    return {name: g.detach() for name, g in vmap(one_point)(x, probes).items()}
