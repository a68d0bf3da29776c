"""Applications built on the looptrace library: the case-study registry and its studies (tasks,
presets, analyses, reports), the training loop that records TracIn checkpoints, the demo and the
benchmarks. Nothing in the library imports this package."""
