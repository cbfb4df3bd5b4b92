"""flexres's benchmarks: one script per protocol, run as ``python -m benchmarks NAME [ARGS]`` (or the script itself).
Their data is ``$FLEXRES_DATA/<dataset>`` (or --data); their results go to benchmarks/results/, one folder per
protocol (benchmarks/results/README.md)."""
