"""Benchmarks of the call path, beside the package: ``python -m benchmarks.run`` (see ``run.py``)."""
