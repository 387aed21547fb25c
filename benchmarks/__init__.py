"""Load tests and benchmarks: every figure is reported beside the floor it is bounded by."""
