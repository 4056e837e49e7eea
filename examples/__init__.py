"""Examples of training real models with AALIG (see examples/README.md)."""
