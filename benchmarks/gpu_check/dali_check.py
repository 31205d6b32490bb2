"""DALI GPU vs CPU pipeline: throughput of ``process`` (host copies) and
``process_device`` (views left on the GPU), FP32 and FP16, on 1080p frames and head
crops. The parity figures come from tests/engine/preprocess/test_dali_gpu.py (-s).
Writes one JSON file; prints one line per configuration."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def main(out_file: str, batch: int = 32, repeats: int = 3) -> int:
    from engine.preprocess import DaliPreprocessor
    from engine.specs import SpecRegistry, Task
    from tests.engine.preprocess import encode, frame_1080p, photo

    registry = SpecRegistry.builtin()
    views = [(s.key, s.preprocess) for s in (registry.get(Task.GENDER), registry.get(Task.QUALITY))]
    frame = frame_1080p()
    head = photo("astronaut")[30:150, 170:270]
    sets = {
        "frames_jpg": [encode(np.roll(frame, i * 7, axis=1), "JPEG", quality=90) for i in range(batch)],
        "frames_png": [encode(np.roll(frame, i * 7, axis=1), "PNG", compress_level=1) for i in range(batch)],
        "crops_jpg": [encode(np.roll(head, i, axis=0), "JPEG", quality=90) for i in range(batch)],
    }
    # (device, mode, dtype, jpeg_fancy_upsampling): the last row prices the pipeline's
    # libjpeg-turbo-like chroma upsampling against nvJPEG's own.
    configs = [("cpu", "process", np.float32, True), ("gpu", "process", np.float32, True),
               ("gpu", "process", np.float16, True), ("gpu", "process_device", np.float16, True),
               ("gpu", "process_device", np.float16, False)]
    rows = []
    for device, mode, dtype, fancy in configs:
        extra = {"jpeg_fancy_upsampling": fancy} if device == "gpu" else {}
        with DaliPreprocessor(views, max_batch=batch, num_threads=8, device=device, output_dtype=dtype, **extra) as pre:
            call = getattr(pre, mode)
            for name, files in sets.items():
                call(files)  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call(files)  # process_device without a stream is host-synchronous
                    times.append(time.perf_counter() - start)
                ips = batch / float(np.median(times))
                row = {"device": device, "mode": mode, "dtype": np.dtype(dtype).name, "set": name,
                       "jpeg_fancy_upsampling": fancy, "images_per_s": round(ips, 1)}
                rows.append(row)
                print(f"dali {device:3s} {mode:15s} {row['dtype']:8s} {name:11s} fancy={int(fancy)} {ips:9.1f} images/s")
    rows += stream_return(views, sets, batch, repeats)
    Path(out_file).write_text(json.dumps(rows, indent=2))
    return 0


def stream_return(views, sets, batch: int, repeats: int) -> list[dict]:
    """Does ``process_device(cuda_stream=...)`` return before its GPU work is done? The
    streamed loop counts on it (DALI on batch k+1 while the executor works on batch k).
    It reads each image's decoded shape, a CPU output of a GPU node, which DALI's
    dynamic executor may make the host wait for. ``host_ms`` close to ``done_ms``: the
    call is effectively synchronous."""
    from engine.gpu import CudaDevice, stream_handle
    from engine.preprocess import DaliPreprocessor

    rows = []
    with CudaDevice(0) as dev, DaliPreprocessor(views, max_batch=batch, num_threads=8, device="gpu",
                                                output_dtype=np.float16) as pre:
        stream = dev.stream()
        handle = stream_handle(stream)
        for name, files in sets.items():
            pre.process_device(files, cuda_stream=handle)  # warm-up
            stream.synchronize()
            host, done = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                produced = pre.process_device(files, cuda_stream=handle)
                returned = time.perf_counter()
                stream.synchronize()
                host.append(returned - start)
                done.append(time.perf_counter() - start)
                del produced
            row = {"device": "gpu", "mode": "process_device_stream", "dtype": "float16", "set": name,
                   "host_ms": round(1e3 * float(np.median(host)), 2), "done_ms": round(1e3 * float(np.median(done)), 2)}
            rows.append(row)
            print(f"dali gpu process_device on a stream {name:11s}: returns after {row['host_ms']} ms, "
                  f"stream done after {row['done_ms']} ms")
        del stream
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
