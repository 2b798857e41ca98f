"""Fake quantization: quantizers (how to round), observers (how to pick the range), attachment by config."""
