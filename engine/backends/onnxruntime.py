"""ONNX Runtime backend: the CPU default (and its CUDA provider where installed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from engine.backends.base import TensorDecl
from engine.errors import ModelError

log = logging.getLogger(__name__)


class OrtBackend:
    """Runs one ONNX model with ONNX Runtime.

    A model pinned to a fixed batch (some published ONNX files are) is fed in chunks of
    that batch, the last one zero-padded; a dynamic-batch model takes the whole batch.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        input_decl: TensorDecl,
        output_decl: TensorDecl,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.precision = precision
        self.inputs = (input_decl,)
        self.outputs = (output_decl,)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(onnx_path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {str(exc).splitlines()[0]}") from exc
        self._in_name = input_decl.name
        self._out_name = output_decl.name
        self._in_dtype = np.dtype(input_decl.dtype)
        self._fixed = input_decl.fixed_batch
        self.providers = tuple(self._session.get_providers())
        log.debug("loaded %s with %s (fixed batch: %s)", onnx_path, self.providers, self._fixed)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("backend is closed")
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)
        if self._fixed is None or self._fixed == len(x):
            return self._session.run([self._out_name], {self._in_name: x})[0]
        out = []
        for start in range(0, len(x), self._fixed):
            chunk = x[start : start + self._fixed]
            n = len(chunk)
            if n < self._fixed:
                pad = np.zeros((self._fixed - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append(self._session.run([self._out_name], {self._in_name: chunk})[0][:n])
        return np.concatenate(out)

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
