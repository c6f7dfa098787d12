"""K-FAC and EK-FAC self-influence from the layer arrays, without ``[B, P]``.

``self_influence`` of a K-FAC state rotates each batch's layer inputs and
output gradients into the Kronecker eigenbases. References: the diagonal of
``influences(data, data)`` (a solve, then the layer-wise scoring: another
path through the code) and the flat quadratic form of the adapter's
per-sample gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import to_numpy
from test_kfac_models import _batches, _require_layers, _wrap

import influx
from influx.solvers import kfac as _kfac


@pytest.mark.parametrize("kind", ["mlp", "cnn"])  # T = 1, T = 9
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("fisher", ["ggn", "mc"])
def test_self_influence_from_layers(
    backend_name: str, kind: str, method: str, fisher: str, monkeypatch: Any
) -> None:
    model = _wrap(backend_name, kind)
    _require_layers(model)
    train = _batches(kind)
    inf = influx.Influence(model, method, 0.1, fisher=fisher).fit(train)
    diagonal = np.diag(to_numpy(inf.influences(train, train)))
    state = inf._fitted.state
    flat = np.concatenate(
        [
            to_numpy(_kfac.quadratic_form(state, model.per_sample_grads(x, y)[0]))
            for x, y in (
                (
                    model.backend.asarray(x, like=model.parameters),
                    model.backend.asarray(y),
                )
                for x, y in train
            )
        ]
    )
    # The layer path must not compute per-sample gradients of whole batches.
    calls = []
    original = type(model).per_sample_grads

    def spy(self: Any, x: Any, y: Any) -> Any:
        calls.append(int(x.shape[0]))
        return original(self, x, y)

    monkeypatch.setattr(type(model), "per_sample_grads", spy)
    values = to_numpy(inf.self_influence(train))
    np.testing.assert_allclose(values, diagonal, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(values, flat, rtol=1e-10, atol=1e-12)
    assert len(calls) <= 1  # only the loss-convention check, on one batch
