"""Batch jobs past one machine on an existing engine (Ray Data): the runtime's predictor in a stateful actor per
worker. Optional: needs the [ray] extra. numpy + the runtime only, never torch."""
