"""The method room (torch, open_clip): checkpoints in; task deltas, per-task truncated factors, theta_MT and
zero-shot heads out, as pure functions on state dicts; and the torch reference MASS model, the oracle."""
