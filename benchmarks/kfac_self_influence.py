"""K-FAC self-influence on a scale workload: layer arrays against per-sample gradients.

``python benchmarks/kfac_self_influence.py [--workload S2] [--flat]`` fits
``Influence(model, "kfac", lambda)`` on the workload's training set (torch,
float32, one thread) and times ``self_influence(train)``: by default from the
layers' inputs and output gradients (no ``[B, P]`` array), with ``--flat``
through the per-sample gradients and the flat quadratic form. Prints CPU
seconds, the rise of the peak resident memory and the sum of the values (the
two paths agree). Needs the cached workload (``python benchmarks/_scale.py``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from _scale import SCALE_SPECS, load_scale
from run_scale import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="S2", choices=sorted(SCALE_SPECS))
    parser.add_argument("--flat", action="store_true")
    args = parser.parse_args()

    import influx
    from influx import attribution

    workload = load_scale(args.workload)
    model, native = build("torch", workload, "float32")
    train = influx.batches(
        native(workload.x_train),
        native(workload.y_train),
        batch_size=workload.spec.batch_size,
    )
    inf = influx.Influence(model, "kfac", workload.spec.hessian_regularization)
    inf.fit(train)
    if args.flat:  # hide the layers from the query: per-sample gradients
        attribution.has_layers = lambda model: False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    values = inf.self_influence(train)
    cpu = time.process_time() - start
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    path = "per-sample gradients" if args.flat else "layer arrays"
    print(
        f"{args.workload} kfac self_influence via {path}: {cpu:.2f} CPU s, "
        f"peak RSS +{rise:.0f} MiB, sum {float(values.sum()):.6g}"
    )


if __name__ == "__main__":
    main()
