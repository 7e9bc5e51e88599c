"""Tools around the library: benchmarks (bench, memory, train-bench), their models and workloads,
and the numerics studies."""
