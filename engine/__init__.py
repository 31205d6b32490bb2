"""Batch engine for two anime-frame classifiers (gender ResNet, face-quality CAFormer).

Importing this package does no GPU work and imports no GPU library; tensorrt,
pycuda and DALI are imported lazily by the code that needs them.
"""

__version__ = "0.1.0"
