"""The ``influx`` command line and ``influx demo``, at a small size.

Run in-process through ``influx.cli.main`` so that coverage sees them. The
demo's CG run is checked against its direct run (the reference), not against
fixed numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import rel_err

import influx.cli
import influx.demo
from influx.demo import DemoResult, run_demo

SMALL = ["--num-train", "40", "--num-test", "6", "--num-flipped", "4"]


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[DemoResult]:
    """Record what ``run_demo`` returns when the command line calls it."""
    results: list[DemoResult] = []

    def record(**options: Any) -> DemoResult:
        results.append(run_demo(**options))
        return results[-1]

    monkeypatch.setattr(influx.demo, "run_demo", record)
    return results


def test_demo_direct_and_cg_on_each_backend(backend_name, capsys, monkeypatch):
    results = _recording(monkeypatch)
    status = influx.cli.main(["demo", "--backend", backend_name, *SMALL])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert err == ""
    kind = {"torch": "TorchBackend", "jax": "JaxBackend"}[backend_name]
    assert out.startswith(f"influx demo: backend {kind}(")
    assert "inversion method 'direct'" in out
    assert "40 training points (4 with flipped labels), 6 test points" in out
    # MLP 4-16-3: 4*16 + 16 + 16*3 + 3 parameters.
    assert "(131 parameters)" in out
    assert out.count("most harmful:") == 3  # three test points reported
    assert "of the 4 flipped labels are among the 4 training points" in out

    # The backend from INFLUX_BACKEND this time, and CG.
    monkeypatch.setenv("INFLUX_BACKEND", backend_name)
    assert influx.cli.main(["demo", "--method", "cg", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"influx demo: backend {kind}(")
    assert "inversion method 'cg'" in out

    direct, cg = results
    assert direct.influences.shape == cg.influences.shape == (6, 40)
    np.testing.assert_array_equal(direct.flipped, cg.flipped)
    assert np.all(np.isfinite(direct.influences))
    # The demo's model is float32; CG stops at its default rtol of 1e-7.
    assert rel_err(cg.influences, direct.influences) < 1e-3


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as raised:
        influx.cli.main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "usage: influx" in out
    assert "demo" in out
    with pytest.raises(SystemExit) as raised:
        influx.cli.main(["demo", "--help"])
    assert raised.value.code == 0
    assert "--method" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--method", "newton"], "invalid choice: 'newton'"),
        (["demo", "--num-train", "many"], "invalid int value: 'many'"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_options_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as raised:
        influx.cli.main(argv)
    assert raised.value.code == 2
    assert match in capsys.readouterr().err


def test_unknown_backend_is_an_error_not_a_traceback(capsys):
    assert influx.cli.main(["demo", "--backend", "nope", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("influx demo: error: Unknown backend 'nope'")
