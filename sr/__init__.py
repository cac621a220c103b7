"""SR INT8 Lab: what INT8 post-training quantization does to super-resolution networks, and how to fix it."""
__version__ = "0.1.0"
