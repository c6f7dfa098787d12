"""The PyTorch example job (``influx run examples/torch/job.toml``)."""
