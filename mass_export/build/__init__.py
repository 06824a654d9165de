"""The build room: checkpoints in, deltas, factors, theta_MT and heads out (torch, open_clip)."""
