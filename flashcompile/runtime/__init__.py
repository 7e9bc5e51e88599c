"""What runs a plan at step time: flat storage (buckets, FSDP2 shard buckets), the per-step
reuse of scalars and device vectors, graph replay of the per-tensor path, and torch.distributed."""
