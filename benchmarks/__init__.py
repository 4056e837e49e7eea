"""Benchmarks of aalig-optax: step overhead and optimisation quality (issue 5).

Run ``python -m benchmarks.run --help`` from the project root.
"""
