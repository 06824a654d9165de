"""torch modules shared by the torch reference (merging) and the ONNX exporter (export): the visual tower run
with weights given per call, the router and the heads. Sharing them is what makes the graphs compute exactly what
the reference computes."""
