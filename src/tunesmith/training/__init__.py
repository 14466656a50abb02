"""Training: the loop, its losses, checkpoints, the process layout, and the mitigations."""
