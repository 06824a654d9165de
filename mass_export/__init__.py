"""mass-export: build, export and serve MASS for open_clip image encoders.

Three rooms with one-way doors: ``mass_export.merging`` (torch) -> ``mass_export.export`` (onnx)
-> ``mass_export.runtime`` (numpy + onnxruntime, never torch). Importing this package imports none of them.
"""

__version__ = "0.1.0"
