"""Example jobs for ``influx run``: one factory and one job file per framework."""
