"""Deployment: packed low-bit checkpoints (``packed.py``) and integer inference through ONNX Runtime."""
