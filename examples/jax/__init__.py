"""The JAX example job (``influx run examples/jax/job.toml``)."""
