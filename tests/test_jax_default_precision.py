"""JAX as most users run it: ``jax_enable_x64`` off, so no float64 anywhere.

The rest of the suite enables x64 (conftest), so this runs in a subprocess
with JAX's defaults. Every method must work in float32 end to end (no float64
accumulation is available) and match the float64 closed form to float32
accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.path.insert(0, {tests!r})
    import jax
    assert not jax.config.jax_enable_x64
    import numpy as np
    import influx
    from models import wrap_mlp
    from test_closed_form import PROBLEM, held_out_data, train_data

    model = wrap_mlp("jax", [(PROBLEM.w, PROBLEM.b)], loss="mse", dtype="float32")
    options = {{
        "direct": {{}},
        "cg": {{"rtol": 1e-6, "atol": 0.0}},
        "arnoldi": {{"rank_estimate": model.num_params}},
        "lissa": {{"maxiter": 1000, "seed": 0}},
    }}
    out = {{}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", influx.NotConvergedWarning)
        for method, kwargs in options.items():
            up = influx.compute_influences(
                model, train_data(), test_data=held_out_data(),
                inversion_method=method, hessian_regularization=0.3, **kwargs,
            )
            out[method] = {{"dtype": str(up.dtype), "up": np.asarray(up).tolist()}}
    print(json.dumps(out))
    """
)


def test_jax_without_x64_runs_in_float32() -> None:
    pytest.importorskip("jax")
    from test_closed_form import PROBLEM, reference

    script = SCRIPT.format(tests=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    expected = reference(PROBLEM, 0.3).up
    tolerance = {"direct": 1e-5, "cg": 1e-5, "arnoldi": 1e-5, "lissa": 5e-2}
    for method, result in results.items():
        assert result["dtype"] == "float32"
        up = np.asarray(result["up"])
        error = np.max(np.abs(up - expected)) / np.max(np.abs(expected))
        assert error < tolerance[method], (method, error)
