"""The streamed executor's logic on the CPU, for real.

The executor runs on :class:`engine.executor.HostDevice` (numpy buffers, one thread per
stream): a complete second implementation of the device interface, not a mock of CUDA.
What is checked here holds for any device: submission order, partial batches
(padding and trimming), slot reuse, buffers allocated once, device-pointer input
ordering, graph/non-graph equality, fallback when capture fails.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.backends.base import TensorDecl
from engine.errors import EngineError, ModelError
from engine.executor import (
    BatchPlan,
    DeviceView,
    ExecutorConfig,
    HostBackend,
    HostDevice,
    OverlapReport,
    Ring,
    SlotState,
    StreamedExecutor,
    Ticket,
    measure_overlap,
    plan_batch,
)


class NumpyModel:
    """A small deterministic "model" with the Backend interface: per-image features
    through a fixed random matrix. Rows are independent, as in an eval-mode CNN."""

    def __init__(self, size: int = 8, classes: int = 4, seed: int = 0, delay_s: float = 0.0,
                 dtype=np.float32, fixed_batch: int | None = None, name: str = "numpy") -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((3 * size * size, classes)).astype(np.float64)
        self.name = name
        self.precision = "fp32"
        self.inputs = (TensorDecl("input", (fixed_batch, 3, size, size), np.dtype(dtype)),)
        self.outputs = (TensorDecl("output", (fixed_batch, classes), np.dtype(np.float32)),)
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.fixed_batch = fixed_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch is not None and len(batch) != self.fixed_batch:
            raise ValueError(f"fixed batch {self.fixed_batch}, got {len(batch)}")
        self.calls.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        x = batch.reshape(len(batch), -1).astype(np.float64)
        return np.tanh(x @ self.w).astype(np.float32)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def batches(n_batches: int, rows: int, last: int | None = None, size: int = 8, seed: int = 1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_batches):
        n = last if (last is not None and k == n_batches - 1) else rows
        out.append(rng.standard_normal((n, 3, size, size)).astype(dtype))
    return out


# --------------------------------------------------------------------------- pure logic


def test_plan_batch_dynamic_without_graph_runs_exact_rows():
    assert plan_batch(5, 8) == BatchPlan(5, 5, False)
    assert plan_batch(8, 8) == BatchPlan(8, 8, False)


def test_plan_batch_graph_pads_partial_batch_or_not():
    assert plan_batch(8, 8, graph_batch=8) == BatchPlan(8, 8, True)
    p = plan_batch(3, 8, graph_batch=8)
    assert p == BatchPlan(3, 8, True) and p.padded
    assert plan_batch(3, 8, graph_batch=8, pad_partial=False) == BatchPlan(3, 3, False)


def test_plan_batch_pads_up_to_the_backends_smallest_batch():
    assert plan_batch(3, 8, min_batch=4) == BatchPlan(3, 4, False)
    assert plan_batch(5, 8, min_batch=4) == BatchPlan(5, 5, False)
    assert plan_batch(3, 8, graph_batch=8, min_batch=4) == BatchPlan(3, 8, True)  # the graph's batch first
    assert plan_batch(3, 8, graph_batch=8, pad_partial=False, min_batch=4) == BatchPlan(3, 4, False)
    with pytest.raises(ValueError, match="smallest batch 9"):
        plan_batch(3, 8, min_batch=9)


def test_plan_batch_fixed_model_always_runs_its_batch():
    assert plan_batch(2, 4, fixed_batch=4) == BatchPlan(2, 4, False)
    assert plan_batch(2, 4, fixed_batch=4, graph_batch=4) == BatchPlan(2, 4, True)


@pytest.mark.parametrize("rows", [0, -1, 9])
def test_plan_batch_rejects_bad_rows(rows):
    with pytest.raises(ValueError):
        plan_batch(rows, 8)


def test_ring_round_robin_and_fifo_retirement():
    ring = Ring(3)
    seen = []
    for seq in range(3):
        slot = ring.acquire()
        ring.launched(Ticket(seq, slot, BatchPlan(1, 1, False)))
        seen.append(slot)
    assert seen == [0, 1, 2] and ring.full
    with pytest.raises(RuntimeError):
        ring.acquire()
    assert ring.retire().seq == 0
    assert ring.states == [SlotState.FREE, SlotState.IN_FLIGHT, SlotState.IN_FLIGHT]
    assert ring.acquire() == 0  # the freed slot is the next one


def test_ring_abandon_gives_the_slot_back():
    ring = Ring(3)
    slot = ring.acquire()
    ring.abandon(slot)
    assert ring.states[slot] is SlotState.FREE and ring.acquire() == slot


def test_ring_rejects_illegal_transitions():
    ring = Ring(3)
    with pytest.raises(RuntimeError):
        ring.launched(Ticket(0, 0, BatchPlan(1, 1, False)))  # FREE -> IN_FLIGHT skips FILLING


def test_executor_config_is_checked():
    with pytest.raises(EngineError):
        ExecutorConfig(batch_size=0)
    with pytest.raises(EngineError):
        ExecutorConfig(batch_size=4, depth=2)


def test_overlap_report_bottleneck_sums_models_per_stage():
    r = OverlapReport(
        images=100,
        stage_seconds={"a": {"host": 0.1, "h2d": 0.2, "compute": 0.5, "d2h": 0.01},
                       "b": {"host": 0.1, "h2d": 0.3, "compute": 0.4, "d2h": 0.01}},
        pipelined_seconds=1.0,
    )
    assert r.bottleneck == "compute"
    assert r.bottleneck_seconds == pytest.approx(0.9)
    assert r.efficiency == pytest.approx(0.9)
    assert r.stage_images_per_s["a"]["compute"] == pytest.approx(200)
    assert r.as_dict()["pipelined_images_per_s"] == pytest.approx(100)


# --------------------------------------------------------------------------- host device


def test_host_stream_runs_in_order_and_events_order_streams():
    with HostDevice() as dev:
        a, b = dev.stream(), dev.stream()
        log = []
        a.submit(lambda: (time.sleep(0.05), log.append("a1")))
        ev = dev.event()
        dev.record(ev, a)
        dev.wait(b, ev)  # b's later work waits for a1
        b.submit(lambda: log.append("b1"))
        done = dev.event()
        dev.record(done, b)
        dev.synchronize(done)
        assert log == ["a1", "b1"]


def test_host_stream_error_reaches_the_host_and_poisons_the_stream():
    with HostDevice() as dev:
        s = dev.stream()
        ran = []

        def fail():
            raise ValueError("kernel failed")

        s.submit(fail)
        s.submit(lambda: ran.append(1))
        ev = dev.event()
        dev.record(ev, s)
        with pytest.raises(RuntimeError, match="kernel failed"):
            dev.synchronize(ev)
        assert ran == []


def test_host_device_copies_bytes():
    with HostDevice() as dev:
        s = dev.stream()
        host = dev.host_empty((4, 3), np.float32)
        host[:] = np.arange(12).reshape(4, 3)
        d = dev.device_empty((4, 3), np.float32)
        back = dev.host_empty((4, 3), np.float32)
        dev.h2d(d, host[:2], s)
        dev.d2h(back[:2], d, s)
        dev.synchronize_stream(s)
        np.testing.assert_array_equal(back[:2], host[:2])
        assert (back[2:] == 0).all()
        with pytest.raises(ValueError):
            dev.h2d(dev.device_empty((1, 3), np.float32), host, s)


# --------------------------------------------------------------------------- executor


def run_alone(model: NumpyModel, batch: np.ndarray) -> np.ndarray:
    return model.run(np.ascontiguousarray(batch, dtype=model.inputs[0].dtype))


def make_executor(models: dict, batch_size=4, **config):
    backends = {k: HostBackend(m) for k, m in models.items()}
    return StreamedExecutor(backends, "host", ExecutorConfig(batch_size=batch_size, **config))


def submit_through_staging(ex, staging, data, keys=("m",), after=None) -> list:
    """Each batch of ``data`` written into ``staging`` (the producer's device buffer) and
    submitted from there, one view of it per model in ``keys``; ``after(b, consumed)``
    runs once the batch's copies out of ``staging`` are done. The completions, drained."""
    got = []
    for b in data:
        staging.array[: len(b)] = b
        view = DeviceView(staging.ptr, b.shape, np.dtype(np.float32))
        done, consumed = ex.submit_device({key: view for key in keys})
        got += done
        consumed.synchronize()
        if after is not None:
            after(b, consumed)
    return got + ex.drain()


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("depth", [3, 5])
def test_outputs_equal_each_batch_alone_in_submission_order(graphs, depth):
    model = NumpyModel(delay_s=0.002)
    data = batches(11, 4)
    with make_executor({"m": model}, graphs=graphs, depth=depth) as ex:
        got = list(ex.run(({"m": b} for b in data), tags=range(100, 111)))
    assert [c.seq for c in got] == list(range(11))
    assert [c.tag for c in got] == list(range(100, 111))
    reference = NumpyModel()
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(reference, b))


def test_results_are_in_order_even_when_later_batches_finish_first():
    class Jittery(NumpyModel):
        def run(self, batch):
            time.sleep(0.03 if batch[0, 0, 0, 0] > 0 else 0.0)  # data-dependent duration
            return super().run(batch)

    data = batches(12, 4, seed=5)
    with make_executor({"m": Jittery()}, graphs=False) as ex:
        got = list(ex.run({"m": b} for b in data))
    ref = NumpyModel()
    assert [c.seq for c in got] == list(range(12))
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(ref, b))


@pytest.mark.parametrize("pad_partial", [True, False])
def test_partial_last_batch_is_padded_or_run_short_and_trimmed(pad_partial):
    model = NumpyModel()
    data = batches(4, 4, last=3)
    with make_executor({"m": model}, pad_partial=pad_partial) as ex:
        got = list(ex.run({"m": b} for b in data))
        stats = ex.stats["m"]
    assert [c.output("m").shape for c in got] == [(4, 4)] * 3 + [(3, 4)]
    ref = NumpyModel()
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(ref, b))
    steady = sorted(model.calls[3:])  # after warm-up on each of 3 slots; slots run concurrently
    if pad_partial:
        assert steady == [4, 4, 4, 4] and stats.padded_batches == 1 and stats.graph_batches == 4
    else:
        assert steady == [3, 4, 4, 4] and stats.padded_batches == 0 and stats.graph_batches == 3
    assert stats.images == 15 and stats.batches == 4


def test_padding_rows_are_zero_not_stale_data():
    seen = []

    class Spy(NumpyModel):
        def run(self, batch):
            seen.append(batch.copy())
            return super().run(batch)

    data = batches(4, 4, last=1)
    with make_executor({"m": Spy()}) as ex:
        list(ex.run({"m": b} for b in data))
    # Slots run on their own stream threads: the last batch need not be the last one run.
    (last,) = [s for s in seen if np.array_equal(s[0], data[-1][0])]
    assert (last[1:] == 0).all()


def test_fixed_batch_model_gets_padded_batches():
    model = NumpyModel(fixed_batch=4)
    data = batches(3, 4, last=2)
    with make_executor({"m": model}, graphs=False) as ex:
        got = list(ex.run({"m": b} for b in data))
    assert set(model.calls) == {4}
    np.testing.assert_array_equal(got[-1].output("m"), run_alone(NumpyModel(), data[-1]))


class AtLeast(NumpyModel):
    """Refuses batches below ``least`` rows, as a TensorRT context refuses an input
    shape outside its optimisation profile."""

    def __init__(self, least: int, **kw) -> None:
        super().__init__(**kw)
        self.least = least

    def run(self, batch):
        if len(batch) < self.least:
            raise ValueError(f"batch {len(batch)} is below the profile minimum {self.least}")
        return super().run(batch)


@pytest.mark.parametrize("graphs", [True, False])
def test_short_batches_are_padded_up_to_the_backends_smallest_batch(graphs):
    model = AtLeast(3)
    data = batches(4, 4, last=1)
    backend = HostBackend(model, min_batch=3)
    config = ExecutorConfig(batch_size=4, graphs=graphs, pad_partial=False)
    with StreamedExecutor({"m": backend}, "host", config) as ex:
        got = list(ex.run({"m": b} for b in data))
        stats = ex.stats["m"]
    assert min(model.calls) == 3 and stats.padded_batches == 1
    assert [c.output("m").shape for c in got] == [(4, 4)] * 3 + [(1, 4)]
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_batch_size_below_the_backends_smallest_batch_is_refused():
    with pytest.raises(ModelError, match="below the smallest batch the backend runs"):
        with StreamedExecutor({"m": HostBackend(NumpyModel(), min_batch=8)}, "host", ExecutorConfig(batch_size=4)):
            pass


@pytest.mark.parametrize("fixed,batch_size,last", [(2, 5, 3), (1, 7, 7), (3, 4, 1)])
def test_a_model_pinned_below_the_batch_size_runs_each_batch_in_pieces(fixed, batch_size, last):
    """Fixed batch 1 under batch size 7: seven pieces a submission on a ring of three,
    so a submission hands back its own first pieces to make room. Results stay in
    order, whole, and equal to the batch run alone; the model only sees its batch."""
    model = NumpyModel(fixed_batch=fixed)
    data = batches(5, batch_size, last=last, seed=11)
    with make_executor({"m": model}, batch_size=batch_size, graphs=False) as ex:
        got = list(ex.run(({"m": b} for b in data), tags=range(5)))
        stats = ex.stats["m"]
    assert set(model.calls) == {fixed}
    assert [c.tag for c in got] == list(range(5))
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))
    pieces = 4 * -(-batch_size // fixed) + -(-last // fixed)
    assert stats.batches == pieces and stats.images == 4 * batch_size + last


def test_a_pinned_model_and_a_dynamic_one_share_submissions_from_device_memory():
    """submit_device cuts the producer's buffer into row-offset views for the pinned
    model; both models' results match their batches alone."""
    pinned, dynamic = NumpyModel(seed=0, fixed_batch=2), NumpyModel(seed=4)
    data = batches(4, 5, last=3, seed=12)
    with HostDevice() as dev:
        staging = dev.device_empty((5, 3, 8, 8), np.float32)
        backends = {"pinned": HostBackend(pinned), "dynamic": HostBackend(dynamic)}
        with StreamedExecutor(backends, dev, ExecutorConfig(5, graphs=False)) as ex:
            def after(b, consumed):
                assert len(consumed.events) == -(-len(b) // 2) + 1  # every piece's copy
                staging.array[:] = np.nan  # the executor holds its own copies now

            got = submit_through_staging(ex, staging, data, ("pinned", "dynamic"), after)
    assert set(pinned.calls) == {2}
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("pinned"), run_alone(NumpyModel(seed=0), b))
        np.testing.assert_array_equal(c.output("dynamic"), run_alone(NumpyModel(seed=4), b))


def test_a_piece_that_fails_drops_its_submission_and_later_ones_stay_right():
    class FailOnce(HostBackend):
        calls = 0
        fail_at = None

        def enqueue(self, slot, batch_size, stream):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("enqueue failed")
            super().enqueue(slot, batch_size, stream)

    flaky = FailOnce(NumpyModel(fixed_batch=1))
    data = batches(4, 5, seed=13)
    with StreamedExecutor({"m": flaky}, "host", ExecutorConfig(5, graphs=False)) as ex:
        got = list(ex.submit({"m": data[0]}, tag=0))
        flaky.fail_at = flaky.calls + 4  # the 4th piece of the second submission (5 pieces each)
        with pytest.raises(RuntimeError, match="enqueue failed"):
            got += ex.submit({"m": data[1]}, tag="lost")
        for k in (2, 3):
            got += ex.submit({"m": data[k]}, tag=k)
        got += ex.drain()
    assert [c.tag for c in got] == [0, 2, 3]
    for c in got:
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), data[c.tag]))


def test_two_models_concurrently_each_equal_alone():
    a, b = NumpyModel(size=8, classes=2, seed=0, delay_s=0.002), NumpyModel(size=6, classes=4, seed=9, delay_s=0.001)
    da, db = batches(7, 4, last=1, size=8, seed=2), batches(7, 4, last=1, size=6, seed=3)
    with make_executor({"gender": a, "quality": b}) as ex:
        got = list(ex.run({"gender": x, "quality": y} for x, y in zip(da, db)))
    ra, rb = NumpyModel(size=8, classes=2, seed=0), NumpyModel(size=6, classes=4, seed=9)
    assert len(got) == 7
    for c, x, y in zip(got, da, db):
        np.testing.assert_array_equal(c.output("gender"), run_alone(ra, x))
        np.testing.assert_array_equal(c.output("quality"), run_alone(rb, y))


def test_a_submission_that_fails_part_way_is_dropped_and_later_ones_stay_right():
    """Model b fails to queue after model a has queued its part: a's orphaned work is
    collected and dropped, never handed to the next submission as its result."""

    class FailOnce(HostBackend):
        fail = False

        def enqueue(self, slot, batch_size, stream):
            if self.fail:
                self.fail = False
                raise RuntimeError("enqueue failed")
            super().enqueue(slot, batch_size, stream)

    a, b = NumpyModel(seed=0, delay_s=0.01), NumpyModel(seed=3)
    flaky = FailOnce(b)
    data = batches(5, 4, seed=7)
    with StreamedExecutor({"a": HostBackend(a), "b": flaky}, "host", ExecutorConfig(4, graphs=False)) as ex:
        got = []
        for k in range(3):  # depth 3: both rings are full, so the next submit collects first
            got += ex.submit({"a": data[k], "b": data[k]}, tag=k)
        flaky.fail = True
        with pytest.raises(RuntimeError, match="enqueue failed"):
            got += ex.submit({"a": data[3], "b": data[3]}, tag="lost")
        got += ex.submit({"a": data[4], "b": data[4]}, tag=4)
        got += ex.drain()
    # what the failed call had collected is handed out by the next one, nothing twice
    assert [c.tag for c in got] == [0, 1, 2, 4] and [c.seq for c in got] == [0, 1, 2, 4]
    for c in got:
        np.testing.assert_array_equal(c.output("a"), run_alone(NumpyModel(seed=0), data[c.tag]))
        np.testing.assert_array_equal(c.output("b"), run_alone(NumpyModel(seed=3), data[c.tag]))


def test_a_models_own_error_on_a_stream_thread_reaches_the_caller_as_is():
    """HostBackend runs the model on the slot's stream thread; its ModelError (an
    output of the wrong shape, say) is what the caller gets, not a wrapped RuntimeError."""

    class WrongRows(NumpyModel):
        def run(self, batch):
            return super().run(batch)[:1]

    with pytest.raises(ModelError, match=r"output shape \(1, 4\), declared \(4, 4\)"):  # at the warm-up run
        with StreamedExecutor({"m": HostBackend(WrongRows())}, "host", ExecutorConfig(4, graphs=False)) as ex:
            list(ex.run({"m": b} for b in batches(2, 4)))


def test_a_submission_may_name_a_subset_of_models():
    a, b = NumpyModel(seed=0), NumpyModel(seed=1)
    data = batches(5, 4)
    with make_executor({"a": a, "b": b}) as ex:
        inputs = [{"a": d, "b": d} if k % 2 == 0 else {"a": d} for k, d in enumerate(data)]
        got = list(ex.run(inputs))
    assert [sorted(c.outputs) for c in got] == [["a", "b"], ["a"], ["a", "b"], ["a"], ["a", "b"]]


def test_buffers_are_allocated_once():
    model = NumpyModel()
    with make_executor({"m": model}) as ex:
        # per slot: pinned out, device in, device out; 3 slots. The pinned input
        # buffer comes with a slot's first host submission.
        assert ex.allocations == 3 * 3
        for c in ex.run({"m": b} for b in batches(3, 4)):
            pass
        after_warm = ex.allocations
        assert after_warm == 3 * 4
        for c in ex.run({"m": b} for b in batches(20, 4, last=2)):
            pass
        assert ex.allocations == after_warm


def test_a_lane_fed_from_device_memory_allocates_no_pinned_input_buffers():
    model = NumpyModel()
    data = batches(7, 4, last=3, seed=13)
    with HostDevice() as dev:
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        with StreamedExecutor({"m": HostBackend(model)}, dev, ExecutorConfig(4, graphs=False)) as ex:
            opened = ex.allocations
            got = submit_through_staging(ex, staging, data)
            assert ex.allocations == opened == 1 + 3 * 3
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_float32_batches_feed_a_float16_model():
    model = NumpyModel(dtype=np.float16)
    data = batches(3, 4)
    with make_executor({"m": model}) as ex:
        got = list(ex.run({"m": b} for b in data))
    ref = NumpyModel(dtype=np.float16)
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(ref, b.astype(np.float16)))


def test_graph_path_equals_plain_path():
    data = batches(6, 4, last=3)
    outs = {}
    for graphs in (True, False):
        with make_executor({"m": NumpyModel()}, graphs=graphs) as ex:
            assert (ex.graph_batch("m") is not None) == graphs
            outs[graphs] = [c.output("m") for c in ex.run({"m": b} for b in data)]
    for x, y in zip(outs[True], outs[False]):
        np.testing.assert_array_equal(x, y)


def test_failed_capture_falls_back_to_plain_enqueue_with_a_warning(caplog):
    class NoGraph(HostBackend):
        def capture(self, slot, batch_size, stream):
            raise RuntimeError("capture not supported by this op")

    backend = NoGraph(NumpyModel())
    data = batches(4, 4)
    with caplog.at_level(logging.WARNING, logger="engine.executor"):
        with StreamedExecutor({"m": backend}, "host", ExecutorConfig(4)) as ex:
            assert ex.graph_batch("m") is None
            got = list(ex.run({"m": b} for b in data))
    assert "graph capture failed" in caplog.text
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_slots_overlap_in_time():
    """Compute of several batches runs at once on the slots' streams."""
    delay, n = 0.05, 6
    with make_executor({"m": NumpyModel(delay_s=delay)}, graphs=False, depth=3) as ex:
        start = time.perf_counter()
        list(ex.run({"m": b} for b in batches(n, 4)))
        elapsed = time.perf_counter() - start
    assert elapsed < 0.7 * n * delay, f"no overlap: {elapsed:.3f} s for {n} x {delay} s"


def test_device_pointer_input_waits_for_the_producer_stream():
    """submit_device: the slot copies from the producer's buffer only after the work
    queued on the producer's stream; Consumed says when the buffer may be reused."""
    model = NumpyModel()
    data = batches(5, 4, last=2)
    with HostDevice() as dev:
        producer = dev.stream()
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        with StreamedExecutor({"m": HostBackend(model)}, dev, ExecutorConfig(4)) as ex:
            got = []
            for b in data:
                def produce(b=b):
                    time.sleep(0.01)  # a slow producer: the copy must not start before this
                    staging.array[: len(b)] = b
                producer.submit(produce)
                view = DeviceView(staging.ptr, b.shape, np.dtype(np.float32))
                done, consumed = ex.submit_device({"m": view}, producer=producer)
                got += done
                consumed.synchronize()  # only now may the producer overwrite `staging`
            got += ex.drain()
        # the executor did not close a device it does not own
        assert dev.stream() is not None
    ref = NumpyModel()
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(ref, b))


def test_a_piece_failing_to_queue_has_its_own_copy_waited_for_before_the_error():
    """The failing slot had queued its copy out of the producer's buffer (behind the
    producer's still busy stream) before its enqueue failed: the error reaches the
    caller only once that copy is done, so the buffer may be dropped at once and the
    slot's next batch does not race it."""

    class FailNext(HostBackend):
        fail = False

        def enqueue(self, slot, batch_size, stream):
            if self.fail:
                raise RuntimeError("enqueue failed")
            super().enqueue(slot, batch_size, stream)

    backend = FailNext(NumpyModel())
    data = batches(2, 4, seed=14)
    with HostDevice() as dev:
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        producer = dev.stream()
        with StreamedExecutor({"m": backend}, dev, ExecutorConfig(4, graphs=False)) as ex:
            backend.fail = True
            producer.submit(lambda: time.sleep(0.3))  # the producer is still writing
            view = DeviceView(staging.ptr, (4, 3, 8, 8), np.dtype(np.float32))
            with pytest.raises(RuntimeError, match="enqueue failed"):
                ex.submit_device({"m": view}, producer=producer)
            assert dev.query(ex._lanes["m"].slots[0].copied_in)
            backend.fail = False
            got = list(ex.run({"m": b} for b in data))
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_bad_inputs_are_refused_before_any_work_is_queued():
    with make_executor({"a": NumpyModel(), "b": NumpyModel()}) as ex:
        good = batches(1, 4)[0]
        with pytest.raises(ValueError, match="shape"):
            ex.submit({"a": good, "b": good[:, :, :4]})
        with pytest.raises(ValueError, match="float"):
            ex.submit({"a": good, "b": good.astype(np.int32)})
        with pytest.raises(ValueError, match="exceeds"):
            ex.submit({"a": np.concatenate([good, good])})
        with pytest.raises(ValueError, match="unknown"):
            ex.submit({"c": good})
        assert ex.drain() == []
        got = list(ex.run([{"a": good, "b": good}]))
        assert len(got) == 1 and got[0].seq == 0


def test_close_is_idempotent_and_submit_needs_open():
    ex = make_executor({"m": NumpyModel()})
    with pytest.raises(RuntimeError):
        ex.submit({"m": batches(1, 4)[0]})
    with ex:
        pass
    ex.close()
    with pytest.raises(RuntimeError):
        ex.open()


def test_errors_in_the_model_reach_the_caller():
    class Broken(NumpyModel):
        def run(self, batch):
            if len(self.calls) >= 4:  # after warm-up
                raise FloatingPointError("bad batch")
            return super().run(batch)

    with pytest.raises(RuntimeError, match="bad batch"):
        with make_executor({"m": Broken()}, graphs=False) as ex:
            list(ex.run({"m": b} for b in batches(5, 4)))
    assert ex.device is None  # closed and released despite the failure


def test_measure_overlap_reports_every_stage():
    with make_executor({"a": NumpyModel(delay_s=0.01), "b": NumpyModel(delay_s=0.005)}) as ex:
        data = [{"a": x, "b": x} for x in batches(6, 4)]
        report = measure_overlap(ex, data)
    assert report.images == 24
    assert set(report.stage_seconds) == {"a", "b"}
    assert all(set(s) == {"host", "h2d", "compute", "d2h"} for s in report.stage_seconds.values())
    assert report.bottleneck == "compute"
    assert 0 < report.efficiency


def test_onnxruntime_backend_through_the_host_executor(tmp_path):
    """A real backend (ONNX Runtime on a tiny graph) driven by the executor."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from engine.backends.onnxruntime import OrtBackend

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())],
    )
    path = tmp_path / "tiny.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime this project allows reads
    onnx.save(model, path)
    in_decl = TensorDecl("input", (None, 3, 8, 8), np.dtype(np.float32))
    out_decl = TensorDecl("output", (None, 5), np.dtype(np.float32))
    data = batches(5, 4, last=3)
    with OrtBackend(path, in_decl, out_decl, threads=1) as ort_backend:
        alone = [ort_backend.run(b) for b in data]
        with StreamedExecutor({"m": HostBackend(ort_backend)}, "host", ExecutorConfig(4)) as ex:
            got = [c.output("m") for c in ex.run({"m": b} for b in data)]
    for g, a in zip(got, alone):
        np.testing.assert_allclose(g, a, rtol=1e-6, atol=1e-6)  # padded vs unpadded batch: same rows


def test_padding_rows_of_a_device_batch_are_zero_not_stale_data():
    """submit_device pads a short batch up to the graph's batch with zeros, not with what
    the slot's buffer held from its previous batch."""
    seen = []

    class Spy(NumpyModel):
        def run(self, batch):
            seen.append(batch.copy())
            return super().run(batch)

    data = batches(4, 4, last=1, seed=16)
    with HostDevice() as dev:
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        with StreamedExecutor({"m": HostBackend(Spy())}, dev, ExecutorConfig(4)) as ex:
            got = submit_through_staging(ex, staging, data)
            assert ex.stats["m"].padded_batches == 1
    # The last batch reuses slot 0, whose buffer still holds the first batch's rows.
    (last,) = [s for s in seen if np.array_equal(s[0], data[-1][0])]
    assert len(last) == 4 and (last[1:] == 0).all()
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_device_copies_read_only_the_rows_of_the_producers_batch():
    """A short piece padded up to its model's batch is copied for its own rows only: the
    producer's buffer may end there (a DALI output of that many rows), and reading past
    it reads memory that is not the batch's."""

    class Recording(HostDevice):
        def __init__(self) -> None:
            super().__init__()
            self.reads: list[tuple[int, int]] = []

        def d2d(self, dst_ptr, src_ptr, nbytes, stream):
            self.reads.append((int(src_ptr), int(nbytes)))
            super().d2d(dst_ptr, src_ptr, nbytes, stream)

    data = batches(3, 5, last=3, seed=17)
    with Recording() as dev:
        staging = dev.device_empty((5, 3, 8, 8), np.float32)
        backends = {"pinned": HostBackend(NumpyModel(fixed_batch=2)), "dynamic": HostBackend(NumpyModel(seed=4))}
        with StreamedExecutor(backends, dev, ExecutorConfig(5)) as ex:  # graphs: the short pieces are padded
            def after(b, consumed):
                end = staging.ptr + b.nbytes
                assert dev.reads and all(staging.ptr <= src and src + n <= end for src, n in dev.reads)
                assert sum(n for _, n in dev.reads) == 2 * b.nbytes  # each model copies each row once
                dev.reads.clear()  # the next batch's copies

            got = submit_through_staging(ex, staging, data, ("pinned", "dynamic"), after)
            assert ex.stats["pinned"].padded_batches == 3 and ex.stats["dynamic"].padded_batches == 1
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("pinned"), run_alone(NumpyModel(fixed_batch=None), b))
        np.testing.assert_array_equal(c.output("dynamic"), run_alone(NumpyModel(seed=4), b))


def test_consumed_covers_the_device_copies_however_slow_they_are():
    """Consumed.synchronize returns only once the slot's copies out of the producer's
    buffer are done, so the producer may overwrite it at once, even when the copies
    themselves take a while (a copy engine busy with other work)."""

    class SlowCopies(HostDevice):
        def d2d(self, dst_ptr, src_ptr, nbytes, stream):
            stream.submit(lambda: time.sleep(0.02))
            super().d2d(dst_ptr, src_ptr, nbytes, stream)

    data = batches(4, 4, last=2, seed=18)
    with SlowCopies() as dev:
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        with StreamedExecutor({"m": HostBackend(NumpyModel())}, dev, ExecutorConfig(4)) as ex:
            def after(b, consumed):
                staging.array[:] = np.nan  # the producer's next batch

            got = submit_through_staging(ex, staging, data, after=after)
    assert len(got) == len(data)
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_an_error_collecting_a_full_ring_waits_for_the_copies_queued_before_it():
    """Model b's earlier batches failed on their streams. The next submit_device queues
    a's copy out of the producer's buffer (behind the producer's still busy stream),
    then collects b's oldest batch to make room and meets its error: the error reaches
    the caller only once a's copy is done, so the producer's buffer may go at once."""
    import threading

    class Armed(NumpyModel):
        armed = False

        def run(self, batch):
            if self.armed:
                raise FloatingPointError("bad batch")
            return super().run(batch)

    b_model = Armed(seed=3)
    gate = threading.Event()
    gate_when_raised = []
    with HostDevice() as dev:
        producer = dev.stream()
        staging = dev.device_empty((4, 3, 8, 8), np.float32)
        view = DeviceView(staging.ptr, (4, 3, 8, 8), np.dtype(np.float32))
        opener = threading.Timer(0.3, gate.set)
        try:
            with pytest.raises(RuntimeError, match="bad batch"):  # again from close(): b's streams are poisoned
                with StreamedExecutor({"a": HostBackend(NumpyModel()), "b": HostBackend(b_model)}, dev,
                                      ExecutorConfig(4, graphs=False)) as ex:
                    b_model.armed = True
                    for _ in range(3):  # both rings full; b's batches fail on their streams
                        assert ex.submit_device({"a": view, "b": view})[0] == []
                    producer.submit(gate.wait)  # the producer is still writing
                    opener.start()
                    try:
                        ex.submit_device({"a": view, "b": view}, producer=producer)
                    finally:
                        gate_when_raised.append(gate.is_set())
        finally:
            gate.set()
            opener.cancel()
    assert gate_when_raised == [True]


def test_a_pinned_model_runs_its_pieces_through_graphs_captured_at_its_own_batch():
    model = NumpyModel(fixed_batch=2)
    data = batches(3, 5, last=3, seed=19)
    with make_executor({"m": model}, batch_size=5) as ex:
        assert ex.graph_batch("m") == 2
        got = list(ex.run({"m": b} for b in data))
        stats = ex.stats["m"]
    assert set(model.calls) == {2}
    # pieces of 2, 2, 1 rows for each 5-row batch, 2 and 1 for the last one
    assert stats.batches == stats.graph_batches == 8 and stats.padded_batches == 3
    for c, b in zip(got, data):
        np.testing.assert_array_equal(c.output("m"), run_alone(NumpyModel(), b))


def test_lane_stats_put_each_stage_time_in_its_own_place():
    delay, n = 0.03, 4
    with make_executor({"m": NumpyModel(delay_s=delay)}, graphs=False) as ex:
        list(ex.run({"m": b} for b in batches(n, 4)))
        s = ex.stats["m"]
    assert s.batches == n and s.compute_ms >= 0.9 * 1e3 * delay * n
    assert s.h2d_ms < s.compute_ms / 4 and s.d2h_ms < s.compute_ms / 4  # a 3 KB copy vs a 30 ms model


def test_a_stage_timed_alone_waits_for_its_last_batches():
    delay = 0.05
    with make_executor({"m": NumpyModel(delay_s=delay)}, graphs=False) as ex:
        assert ex.time_stage("m", "compute", batches(3, 4)) >= delay  # one batch per slot: all at once


def test_close_waits_for_the_batches_still_in_flight():
    finished = []

    class Slow(NumpyModel):
        def run(self, batch):
            out = super().run(batch)
            finished.append(len(batch))
            return out

    with HostDevice() as dev:  # the caller's device: its streams outlive the executor
        with StreamedExecutor({"m": HostBackend(Slow(delay_s=0.05))}, dev, ExecutorConfig(4, graphs=False)) as ex:
            warm = len(finished)
            for b in batches(3, 4):
                assert ex.submit({"m": b}) == []
        # closed without draining: every queued batch ran to its end before its buffers went
        assert len(finished) == warm + 3


def test_a_failed_open_releases_the_device_it_made():
    import threading

    class WrongRows(NumpyModel):
        def run(self, batch):
            return super().run(batch)[:1]

    before = set(threading.enumerate())
    ex = StreamedExecutor({"m": HostBackend(WrongRows())}, "host", ExecutorConfig(4, graphs=False))
    with pytest.raises(ModelError, match="output shape"):
        ex.open()  # the warm-up run fails
    assert ex.device is None
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("host-stream")] == []


def test_a_device_batch_of_another_dtype_is_refused_before_any_copy():
    with HostDevice() as dev:
        staging = dev.device_empty((4, 3, 8, 8), np.float16)
        with StreamedExecutor({"m": HostBackend(NumpyModel())}, dev, ExecutorConfig(4)) as ex:
            with pytest.raises(ValueError, match="is float16, the model takes float32"):
                ex.submit_device({"m": DeviceView(staging.ptr, (4, 3, 8, 8), np.dtype(np.float16))})
            assert ex.drain() == []
            assert ex.stats["m"].batches == 0


def test_importing_the_executor_imports_no_gpu_package():
    code = (
        "import sys, engine.executor, engine.gpu, engine.backends.tensorrt, engine.backends.torch_cuda\n"
        "bad = [m for m in ('pycuda', 'tensorrt', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- tensor declarations and zero padding


def test_a_declared_tensor_names_its_fixed_batch_and_lives_on_the_host_by_default():
    assert TensorDecl("input", (4, 3, 8, 8), np.dtype(np.float32)).fixed_batch == 4
    assert TensorDecl("input", (None, 3, 8, 8), np.dtype(np.float32)).fixed_batch is None
    assert TensorDecl("scale", (), np.dtype(np.float32)).fixed_batch is None  # a scalar: no batch at all
    assert TensorDecl("input", (None, 3, 8, 8), np.dtype(np.float32)).device == "cpu"


def test_zero_padding_keeps_the_dtype_and_leaves_a_full_batch_as_it_is():
    from engine.backends.base import zero_padded

    batch = np.ones((2, 3, 4, 4), np.float16)
    padded = zero_padded(batch, 4)
    assert padded.dtype == np.float16 and padded.shape == (4, 3, 4, 4)
    assert np.array_equal(padded[:2], batch) and not padded[2:].any()
    assert zero_padded(batch, 2) is batch
