"""kangaroo_lit: train and evaluate lossless self-speculative decoding with PyTorch Lightning."""

__version__ = "0.1.0"
