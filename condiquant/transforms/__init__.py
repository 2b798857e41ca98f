"""Offline weight transforms applied to the FP model before quantizers are attached."""
