"""Expert parallelism on torch.distributed: sharding and exchanges, the per-rank worker, its records."""
