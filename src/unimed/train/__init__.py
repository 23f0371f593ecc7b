"""Training: loop, optimisation, checkpoints and distributed helpers."""
