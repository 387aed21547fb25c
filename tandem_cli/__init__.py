"""The `tandem` command: the top layer, the one package that may import every side
(`edge`, `cloud`, `benchmarks`) on top of the shared `tandem` base."""
