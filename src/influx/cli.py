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
            "Train a small MLP on generated data with some flipped labels, compute "
            "the influence of every training point on the test points and print the "
            "most helpful and most harmful ones. The backend is --backend, else "
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
    run = commands.add_parser(
        "run",
        help="run an influence job described by a TOML file",
        description=(
            "Fit, score every training point against every test point into a "
            "resumable zarr store, and optionally compute self-influence and the "
            "top k, as the job file says (see influx.job for its keys). Running "
            "the same job again computes only what is missing."
        ),
    )
    run.add_argument("job", help="the job file (.toml)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (sizes, chunks, memory per worker) and exit",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="no stage messages or bars"
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
            )
        except (ImportError, ValueError, TypeError) as error:
            print(f"influx demo: error: {error}", file=sys.stderr)
            return 2
    elif args.command == "run":
        return _run(args.job, dry_run=args.dry_run, progress=not args.no_progress)
    return 0


def _run(path: str, *, dry_run: bool, progress: bool) -> int:
    """``influx run``: errors in the job are one line on stderr and status 2."""
    from influx.errors import InputError
    from influx.job import load_job, run_job

    try:
        job = load_job(path)
        result = run_job(job, dry_run=dry_run, progress=progress)
    except InputError as error:
        plan = getattr(error, "plan", None)
        if dry_run and plan is not None:
            print(plan)
        print(f"influx run: error: {error}", file=sys.stderr)
        return 2
    if dry_run:
        print(result.plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
