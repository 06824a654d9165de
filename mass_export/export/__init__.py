"""The export room (torch.onnx, onnx): the four graphs of docs/build-format.md and their validation against the
torch reference."""
