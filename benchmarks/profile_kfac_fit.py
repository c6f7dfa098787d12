"""What bounds influx's K-FAC / EK-FAC fit on an S workload: the loss check.

``python benchmarks/profile_kfac_fit.py --workload S2 --method kfac
[--no-loss-check] [--batch-size 500]`` fits once (cold, torch, one thread)
and prints the CPU seconds and the peak memory rise. ``--no-loss-check``
replaces influx's loss-convention check (which computes the per-sample
gradients ``[B, P]`` of the first batch) by a no-op, to show its share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure
from _scale import SCALE_SPECS, load_scale, torch_module

import influx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="S2", choices=sorted(SCALE_SPECS))
    parser.add_argument("--method", default="kfac")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--no-loss-check", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_loss_check:
        import influx._loss_check as loss_check

        loss_check.LossConventionCheck.__call__ = lambda self, *a, **k: None
    workload = load_scale(args.workload)
    model = influx.twice_differentiable(
        torch_module(workload), torch.nn.functional.cross_entropy
    )
    train = influx.batches(
        torch.from_numpy(workload.x_train),
        torch.from_numpy(workload.y_train),
        batch_size=args.batch_size,
    )
    lam = workload.spec.hessian_regularization

    def fit() -> None:
        influx.Influence(model, args.method, hessian_regularization=lam).fit(train)

    m, _ = measure(fit, 0)
    print(
        f"{args.workload} {args.method} batch {args.batch_size} loss check "
        f"{'off' if args.no_loss_check else 'on'}: {m['cold_cpu_s']:.2f} CPU s, "
        f"peak {m['peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
