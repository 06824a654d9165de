"""The shared floor of every room: errors, the models/ catalog, the build manifest and the numpy math
(Gram-form TSV-M, routing selection, task-set weights). numpy and the standard library only: the runtime
stands on it, so it never imports torch, onnx or another room."""
