"""The names of a bundle's files: written by ``hub``, read by ``runtime`` and ``serve`` (no torch here)."""

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
REQUIRED = ("model.safetensors", "config.json", "model.onnx", "README.md", "export.json")
CHECKSUMS = "checksums.sha256"
