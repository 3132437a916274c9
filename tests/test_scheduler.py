"""One CPU scheduler, prefetch and cancellation (``detector.scheduler``, ``detector.prefetch``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from detector import limits
from detector.base import Detector, MethodOutput
from detector.scheduler import CancelToken, CpuScheduler
from detector.service import InspectionService
from detector.spec import MethodSpec

GUARD = 60.0  # generous bound against hangs, not a speed target


class SteppedDetector(Detector):
    """Fits in ``steps`` progress steps, each waiting for ``gate``; score = |mean - reference|."""

    spec = MethodSpec(display_name="Stepped", default_backbone="tiny-test", default_weights="random", resize="squash", default_sigma=0.0)

    def __init__(self, name, probe, **options):
        super().__init__(class_name=options.pop("class_name", "object"))
        self.name = name
        self.probe = probe

    def _fit(self, normals, progress):
        with self.probe.lock:
            self.probe.fitting += 1
        try:
            for step in range(self.probe.steps):
                assert self.probe.gate.wait(GUARD)
                with self.probe.lock:  # model work: never two pieces at once
                    self.probe.working += 1
                    self.probe.most = max(self.probe.most, self.probe.working)
                time.sleep(0.002)
                with self.probe.lock:
                    self.probe.working -= 1
                self.probe.events.append(("fit-step", self.name, step))
                if progress is not None:
                    progress((step + 1) / self.probe.steps, f"step {step + 1}/{self.probe.steps}")
            self.reference = float(np.mean([im.rgb.mean() for im in normals.images])) if len(normals) else 0.0
        finally:
            with self.probe.lock:
                self.probe.fitting -= 1

    def _encode(self, batch):
        self.probe.events.append(("predict", self.name, None))
        return [float(image.rgb.mean()) for image in batch.images]

    def _score(self, encoded, batch):
        return [MethodOutput(abs(m - self.reference) / 255.0, np.zeros((2, 2), np.float32)) for m in encoded]


class Probe:
    def __init__(self, steps=3):
        self.steps = steps
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.fitting = 0
        self.working = 0
        self.most = 0
        self.events = []
        self.built = 0

    def factory(self, name, *, backbone=None, backbone_weights=None, checkpoint=None, device="cpu", **options):
        self.built += 1
        return SteppedDetector(name, self, **options)


def flat(value, size=(16, 16)):
    return np.full((*size, 3), value, np.uint8)


def wait_until(condition, what):
    end = time.monotonic() + GUARD
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_cancelled_prefetch_leaves_nothing_behind():
    probe = Probe(steps=5)
    probe.gate.clear()
    service = InspectionService(factory=probe.factory)
    job = service.prefetcher.start("session-a", ["inctrl"], [flat(10)])
    wait_until(lambda: probe.fitting == 1, "the fit to start")
    service.prefetcher.start("session-a", ["inctrl"], [flat(99)])  # a new upload replaces the work
    assert job.token.cancelled and job.status() == "cancelled"
    probe.gate.set()
    job.wait(GUARD)  # the cancelled fit stops at its next step
    newer = service.prefetcher.job("session-a")
    newer.wait(GUARD)
    assert newer.status() == "InCTRL on 1 normal: ready"
    assert len(service.cached_keys()) == 1  # only the new normals' fit
    assert service.fit_count == 1 and len(service._key_locks) == 1 and not service._waiters


def test_cancelling_never_stops_a_fit_another_session_waits_on():
    probe = Probe(steps=4)
    probe.gate.clear()
    service = InspectionService(factory=probe.factory)
    normals = [flat(40), flat(60)]
    job = service.prefetcher.start("a", ["inctrl"], normals)
    wait_until(lambda: probe.fitting == 1, "the prefetch fit to start")
    results = {}
    other = threading.Thread(target=lambda: results.setdefault("b", service.inspect(["inctrl"], normals, flat(200))))
    other.start()
    wait_until(lambda: sum(service._waiters.values()) == 2, "session b to wait on the same fit")
    service.prefetcher.cancel("a")  # session a closes
    probe.gate.set()
    other.join(GUARD)
    job.wait(GUARD)
    report = results["b"]
    assert report.outcomes[0].reused_fit and service.fit_count == 1 and probe.built == 1
    assert report.outcomes[0].result.score == pytest.approx(150 / 255)


def test_a_request_runs_before_background_work():
    probe = Probe(steps=6)
    probe.gate.clear()
    service = InspectionService(factory=probe.factory)
    service.prefetcher.start("background", ["inctrl"], [flat(1)])
    wait_until(lambda: probe.fitting == 1, "the background fit to start")
    done = threading.Event()
    threading.Thread(target=lambda: (service.inspect(["inctrl"], [flat(2)], flat(3)), done.set())).start()
    wait_until(lambda: service.scheduler._foreground_waiting == 1, "the request to wait for the slot")
    probe.gate.set()
    assert done.wait(GUARD)
    service.prefetcher.job("background").wait(GUARD)
    kinds = [kind for kind, _ in service.scheduler.grants]
    first_foreground = kinds.index("foreground")
    assert kinds[:first_foreground] == ["background"]  # the background fit held the slot ...
    assert kinds[first_foreground + 1 :].count("background") >= 1  # ... and resumed only after the request
    steps = [e for e in probe.events if e[0] == "fit-step"]
    request_fit = [i for i, e in enumerate(probe.events) if e[0] == "predict"][0]
    background_steps_before = sum(1 for i, e in enumerate(probe.events[:request_fit]) if e[0] == "fit-step")
    assert background_steps_before < 6 + 6 and len(steps) == 12  # the request finished before the background fit did


def test_twelve_sessions_get_their_own_results_and_background_work_stays_bounded():
    probe = Probe(steps=2)
    service = InspectionService(factory=probe.factory)
    values = [10 + 15 * i for i in range(12)]
    for i, value in enumerate(values):
        service.prefetcher.start(f"s{i}", ["inctrl"], [flat(value)])
    reports = {}

    def run(i):
        reports[i] = service.inspect(["inctrl"], [flat(values[i])], flat(250))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD)
    for i in range(12):
        service.prefetcher.job(f"s{i}").wait(GUARD)
        assert reports[i].outcomes[0].result.score == pytest.approx(abs(250 - values[i]) / 255)
    assert probe.most == 1  # one piece of model work at a time: the scheduler's single slot
    assert service.fit_count == 12


def test_scheduler_slot_is_reentrant_and_background_is_bounded():
    scheduler = CpuScheduler(background_jobs=1)
    with scheduler.slot("outer"):
        with scheduler.slot("inner"):
            pass
    running, most = [0], [0]
    lock = threading.Lock()

    def job():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    futures = [scheduler.submit(job) for _ in range(5)]
    for future in futures:
        future.result(GUARD)
    assert most[0] == 1
    with pytest.raises(ValueError):
        CpuScheduler(background_jobs=0)
    token = CancelToken()
    token.check("fine")
    token.cancel()
    with pytest.raises(Exception, match="cancelled"):
        token.check("stage")


def test_the_scheduler_remembers_a_bounded_number_of_grants():
    scheduler = CpuScheduler()
    for index in range(limits.SCHEDULER_GRANTS_KEPT + 5):
        with scheduler.slot(f"piece {index}"):
            pass
    assert len(scheduler.grants) == limits.SCHEDULER_GRANTS_KEPT
    assert scheduler.grants[0] == ("foreground", "piece 5")
    assert scheduler.grants[-1] == ("foreground", f"piece {limits.SCHEDULER_GRANTS_KEPT + 4}")


class CalibratingDetector(SteppedDetector):
    """A SteppedDetector whose leave-one-out runs one gated "encoder pass" per normal."""

    def _fit(self, normals, progress):
        super()._fit(normals, progress)
        self.means = [float(image.rgb.mean()) for image in normals.images]

    def _leave_one_out(self, progress=None):
        if len(self.means) < 2:
            return None
        outputs = []
        for index, mean in enumerate(self.means):
            if progress is not None:
                progress(index / len(self.means), f"normal {index + 1}")
            self.probe.passes_started += 1
            assert self.probe.calibration_gate.wait(GUARD)
            self.probe.events.append(("calibration-pass", self.name, index))
            others = [m for j, m in enumerate(self.means) if j != index]
            outputs.append(MethodOutput(abs(mean - float(np.mean(others))) / 255.0, np.zeros((2, 2), np.float32)))
        return outputs


def test_a_background_calibration_lets_a_request_go_between_its_passes():
    probe = Probe(steps=1)
    probe.calibration_gate = threading.Event()
    probe.passes_started = 0
    probe.factory = lambda name, **kw: CalibratingDetector(name, probe)
    service = InspectionService(factory=probe.factory)
    # The method whose calibration is deferred (its spec's cost says so) is shown provisional.
    *_, shown = service.iter_inspect(["faprompt"], [flat(10), flat(20), flat(30)], flat(40), defer_final_calibration=True)
    assert shown.outcomes[0].provisional and shown.outcomes[0].calibration.source == "default"
    future = service.calibrate_in_background(shown)
    wait_until(lambda: probe.passes_started == 1, "the calibration's first pass to start")
    done = threading.Event()
    threading.Thread(target=lambda: (service.inspect(["faprompt"], [flat(90)], flat(99)), done.set())).start()
    wait_until(lambda: service.scheduler._foreground_waiting == 1, "the request to wait for the slot")
    probe.calibration_gate.set()
    final = future.result(GUARD)
    assert done.wait(GUARD)
    assert not final.outcomes[0].provisional and final.outcomes[0].calibration.source == "leave-one-out over 3 normals"
    assert final.outcomes[0].result is shown.outcomes[0].result  # the same answer, its final calibration
    passes = [i for i, e in enumerate(probe.events) if e[0] == "calibration-pass"]
    request = [i for i, e in enumerate(probe.events) if i > passes[0] and e[0] in ("fit-step", "predict")]
    assert len(request) == 2 and request[0] < passes[1]  # the request's work started between two passes ...
    assert request[1] < passes[-1]  # ... and it was answered before the calibration ended
    assert service.calibrate_in_background(final) is None  # nothing provisional is left


class PassGate:
    """Lets a given number of calibration passes through (``wait`` as ``threading.Event``'s)."""

    def __init__(self):
        self._passes = threading.Semaphore(0)

    def allow(self, passes=1):
        for _ in range(passes):
            self._passes.release()

    def wait(self, timeout=None):
        return self._passes.acquire(timeout=timeout)


def calibrating_service():
    """FAPrompt (its spec defers the calibration) as a ``CalibratingDetector`` gated pass by
    pass; the other methods calibrate without a gate."""
    probe = Probe(steps=1)
    probe.calibration_gate = PassGate()
    probe.passes_started = 0
    probe.factory = lambda name, **kw: (CalibratingDetector if name == "faprompt" else SteppedDetector)(name, probe)
    return probe, InspectionService(factory=probe.factory)


def test_a_prefetch_fits_first_and_a_run_waits_for_no_calibration():
    probe, service = calibrating_service()
    normals = [flat(10), flat(20), flat(30)]
    job = service.prefetcher.start("s", ["inctrl", "faprompt"], normals)
    wait_until(lambda: probe.passes_started == 1, "the prefetch's calibration to start")
    fitted = {name for kind, name, _ in probe.events if kind == "fit-step"}
    assert fitted == {"inctrl", "faprompt"}  # every fit came before the first calibration pass
    assert "calibrating FAPrompt" in job.status() and "InCTRL: ready" in job.status()
    reports = []
    done = threading.Event()
    run = lambda: (reports.extend(service.iter_inspect(["faprompt"], normals, flat(40), defer_final_calibration=True)), done.set())  # noqa: E731
    threading.Thread(target=run).start()
    wait_until(lambda: service.scheduler._foreground_waiting == 1, "the Run to wait for the slot")
    probe.calibration_gate.allow(1)  # one pass ends: the Run goes next, without the other passes
    assert done.wait(GUARD)
    outcome = reports[-1].outcomes[0]
    assert outcome.provisional and outcome.reused_fit and outcome.calibration.source == "default"
    assert [kind for kind, _, _ in probe.events].count("calibration-pass") == 1
    probe.calibration_gate.allow(10)
    job.wait(GUARD)
    assert job.status() == "InCTRL, FAPrompt on 3 normals: ready"
    final = service.inspect(["faprompt"], normals, flat(40))
    assert final.outcomes[0].calibration.source == "leave-one-out over 3 normals" and probe.passes_started == 3


def test_a_cancelled_calibration_leaves_the_fit_usable_and_provisional():
    probe, service = calibrating_service()
    normals = [flat(10), flat(20), flat(30)]
    job = service.prefetcher.start("s", ["faprompt"], normals)
    wait_until(lambda: probe.passes_started == 1, "the calibration to start")
    service.prefetcher.cancel("s")
    probe.calibration_gate.allow(10)
    job.wait(GUARD)
    assert probe.passes_started == 1  # stopped at the next pass
    (entry,) = service._cache.values()
    assert entry.provisional and entry.calibration.source == "default" and entry.calibration_callers == 0
    report = service.inspect(["faprompt"], normals, flat(40))  # whoever needs it final calibrates it
    assert report.outcomes[0].reused_fit and report.outcomes[0].calibration.source == "leave-one-out over 3 normals"


def test_cancelling_never_stops_a_calibration_another_caller_waits_on():
    probe, service = calibrating_service()
    normals = [flat(10), flat(20), flat(30)]
    job = service.prefetcher.start("s", ["faprompt"], normals)
    wait_until(lambda: probe.passes_started == 1, "the calibration to start")
    reports = []
    other = threading.Thread(target=lambda: reports.append(service.inspect(["faprompt"], normals, flat(40))))
    other.start()
    wait_until(lambda: service.scheduler._foreground_waiting == 1, "the other caller's predict to wait for the slot")
    probe.calibration_gate.allow(1)  # it predicts between two passes, then waits for the calibration
    (entry,) = service._cache.values()
    wait_until(lambda: entry.calibration_callers == 2, "the other caller to wait on the calibration")
    service.prefetcher.cancel("s")
    probe.calibration_gate.allow(10)
    job.wait(GUARD)
    other.join(GUARD)
    assert probe.passes_started == 3  # one calibration, finished for the waiting caller
    assert reports[0].outcomes[0].calibration.source == "leave-one-out over 3 normals" and not entry.provisional


def test_a_background_calibration_waits_for_the_requests_in_flight():
    scheduler = CpuScheduler()
    order = []
    with scheduler.request():
        future = scheduler.submit(lambda: (scheduler.wait_for_requests(), order.append("calibration")))
        time.sleep(0.05)
        assert not future.done()  # it waits while the request is in flight, between its slots too
        order.append("request")
    future.result(GUARD)
    assert order == ["request", "calibration"]
    scheduler.wait_for_requests()  # outside background work: never waits


def test_a_run_waiting_on_a_prefetch_fit_predicts_before_the_prefetch_calibrates():
    probe, service = calibrating_service()
    probe.gate.clear()  # FAPrompt's fit waits at its first step; its calibration comes right after
    normals = [flat(10), flat(20), flat(30)]
    job = service.prefetcher.start("s", ["faprompt"], normals)
    wait_until(lambda: probe.fitting == 1, "the prefetch's fit to start")
    reports = []
    run = threading.Thread(
        target=lambda: reports.extend(service.iter_inspect(["faprompt"], normals, flat(40), defer_final_calibration=True))
    )
    run.start()
    wait_until(lambda: sum(service._waiters.values()) == 2, "the Run to wait on the same fit")
    probe.gate.set()
    probe.calibration_gate.allow(10)
    run.join(GUARD)
    job.wait(GUARD)
    grants = service.scheduler.grants
    assert reports[-1].outcomes[0].reused_fit and reports[-1].outcomes[0].provisional
    # The Run's predict got the slot before the prefetch's calibration did (not queued behind it).
    assert grants.index(("foreground", "predict faprompt")) < grants.index(("background", "calibrate faprompt"))
