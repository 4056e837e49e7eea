"""Benchmarks of aalig-optax: step overhead and optimisation quality.

Run ``python -m benchmarks.run --help`` from the project root.
"""
