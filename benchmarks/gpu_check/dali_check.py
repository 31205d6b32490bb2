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
    Path(out_file).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
