"""Side-by-side benchmarks (`make bench` runs `python -m bench.run`)."""
