"""The Echo example service, used by the examples, the tests and the benchmarks."""
