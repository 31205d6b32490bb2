"""Benchmark suite: the same images through the PyTorch reference pipeline and the engine.

Importing this package is light: torch, DALI, ONNX Runtime and matplotlib are imported
inside the functions that use them. Entry points:

* :func:`benchmarks.suite.run_bench` (library) and ``benchmarks.suite.add_arguments`` /
  ``benchmarks.suite.main`` (what ``engine bench`` calls);
* :func:`benchmarks.compare.compare` and ``benchmarks.compare.add_arguments`` /
  ``benchmarks.compare.main`` (the regression check);
* ``python -m benchmarks run|compare|plot`` without the engine CLI.
"""
