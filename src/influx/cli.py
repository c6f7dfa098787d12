"""The ``influx`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influx",
        description="Influence functions for PyTorch and JAX models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a small classifier with flipped labels and find them",
        description=(
            "Train a small MLP on generated data with some flipped labels, rank the "
            "training points by self-influence and report how many flipped labels "
            "are near the top, then print the most helpful and most harmful "
            "training points of a few test points. The backend is --backend, else "
            "INFLUX_BACKEND, else torch if installed, else jax."
        ),
    )
    demo.add_argument("--backend", default=None, help="torch or jax")
    demo.add_argument(
        "--method",
        default="direct",
        choices=["direct", "cg", "lissa", "arnoldi"],
        help="inversion method (default: direct)",
    )
    demo.add_argument("--num-train", type=int, default=300)
    demo.add_argument("--num-test", type=int, default=100)
    demo.add_argument("--num-flipped", type=int, default=15)
    demo.add_argument("--regularization", type=float, default=0.01)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--curvature",
        default="ggn",
        choices=["ggn", "hessian"],
        help="the matrix inverted (default: ggn, the Gauss-Newton matrix)",
    )
    demo.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help='save the detection curve as a picture (needs "influx[plot]")',
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from influx.demo import run_demo

        try:
            run_demo(
                backend=args.backend,
                method=args.method,
                num_train=args.num_train,
                num_test=args.num_test,
                num_flipped=args.num_flipped,
                regularization=args.regularization,
                seed=args.seed,
                curvature=args.curvature,
                plot=args.plot,
            )
        except (ImportError, ValueError, TypeError) as error:
            print(f"influx demo: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
