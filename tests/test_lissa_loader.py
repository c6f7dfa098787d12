"""LiSSA fed by a torch ``DataLoader`` equals Direct to LiSSA's tolerance.

The loader shuffles and has a short last batch; influx reads it in dataset
order. With its defaults (Nystrom preconditioner, variance reduction) LiSSA
meets its rtol on several batches, so the comparison is with the exact solve,
not a percentage.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import mlp_weights, rel_err, to_numpy, wrap_mlp

import influx

torch = pytest.importorskip("torch")

SIZES = (3, 5, 2)  # P = 32
N, N_TEST = 30, 4
REG = 5.0
RTOL = 1e-7


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> object:
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator
    )


def test_lissa_on_a_dataloader_equals_direct():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((N, 3)), rng.standard_normal((N, 2))
    xt, yt = rng.standard_normal((N_TEST, 3)), rng.standard_normal((N_TEST, 2))
    model = wrap_mlp("torch", mlp_weights(SIZES, seed=4))
    train = _loader(x, y, batch_size=8, seed=0)  # 8, 8, 8, 6
    test = _loader(xt, yt, batch_size=3, seed=1)

    direct = influx.Influence(model, "direct", REG).fit(train)
    lissa = influx.Influence(model, "lissa", REG, rtol=RTOL, maxiter=3000, seed=0)
    lissa.fit(train)
    expected = to_numpy(direct.factors(test))
    factors = to_numpy(lissa.factors(test))
    assert lissa.info.method == "lissa"
    assert bool(np.all(lissa.info.converged))
    assert factors.shape == (N_TEST, model.num_params)
    # The residual is below rtol * ||b||; the error is at most the condition
    # number (a few here) times that. Observed: 2e-8.
    assert rel_err(factors, expected) < 1e-6
