"""Orchestration above the method and export rooms: `mass-export build` (merge, export, validate, write the
build directory atomically)."""
