"""A client process for tests/test_faults.py: score into a store on its own cluster.

``python tests/fault_client_run.py STORE LOG_DIR BACKEND DELAY`` fits the
fault tests' MLP in this process, starts a 2-worker ``LocalCluster`` and
writes ``influences(test, train, out=STORE, client=client)``, the training
data a :func:`fault_support.slow_data` source (each batch read sleeps
``DELAY`` seconds and is logged under ``LOG_DIR``). The test kills it
mid-run, then runs it again to completion.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "backends")]


def main(store: str, log_dir: str, backend: str, delay: float) -> None:
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    import fault_support as fs
    from conftest import local_cluster_options
    from distributed import Client, LocalCluster
    from models import mlp_weights, wrap_mlp

    import influx

    model = wrap_mlp(backend, mlp_weights(fs.SIZES))
    inf = influx.Influence(model, "direct", 1e-3, curvature="ggn")
    inf.fit(influx.batches(*fs.arrays(), batch_size=fs.BATCH))
    train = influx.FactorySource(
        "fault_support:slow_data",
        log_dir=log_dir,
        delay=delay,
        batch_size=fs.BATCH,
        partition_size=fs.PARTITION,
    )
    test = influx.batches(*fs.query_arrays(), batch_size=fs.N_TEST)
    with (
        LocalCluster(
            **{**local_cluster_options(2), "dashboard_address": ":0"}
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(fs.warm_up, backend)
        inf.influences(test, train, out=store, client=client)
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
