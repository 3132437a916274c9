"""detector.answer_order and the service's report stream: fastest first, close answers together."""

from __future__ import annotations

import pytest

from detector.answer_order import answer_cost, due_within, fastest_first
from detector.registry import list_methods
from detector.service import InspectionService, ServiceConfig
from test_service import counting_factory, flat

NORMALS = [flat(100), flat(120), flat(140)]


def test_fastest_first_follows_the_declared_costs_and_a_cached_fit_costs_nothing():
    methods = list_methods()
    for fitted in ({}, {m: True for m in methods}):
        order = fastest_first(methods, 3, fitted)
        costs = [answer_cost(m, 3, fitted.get(m, False)) for m in order]
        assert sorted(order) == sorted(methods) and costs == sorted(costs)
    # The method with the costliest fit per normal answers sooner once its fit is cached.
    slow_fit = max(methods, key=lambda m: answer_cost(m, 3, False) - answer_cost(m, 3, True))
    assert fastest_first(methods, 3, {slow_fit: True}).index(slow_fit) < fastest_first(methods, 3, {}).index(slow_fit)
    assert not due_within(slow_fit, 3, True, 0.0)  # 0: never hold an answer back
    assert due_within(slow_fit, 3, True, answer_cost(slow_fit, 3, True))
    assert not due_within(slow_fit, 3, False, answer_cost(slow_fit, 3, True))


def fitted_service():
    """A service of counting detectors with every method fitted on ``NORMALS``, and the
    order a query then runs them in."""
    service = InspectionService(ServiceConfig(), factory=counting_factory({}))
    for method in list_methods():
        service.fitted(method, NORMALS)
    return service, fastest_first(list_methods(), len(NORMALS), {m: True for m in list_methods()})


def shown(reports):
    return [[o.method for o in report.outcomes] for report in reports]


def test_answers_due_soon_after_another_come_in_one_report():
    service, order = fitted_service()
    first, second, third = order
    within = answer_cost(second, 3, True)
    assert answer_cost(third, 3, True) > within, "the declared costs no longer separate the methods"
    reports = list(service.iter_inspect(order, NORMALS, flat(200), defer_final_calibration=True, coalesce_within=within))
    assert [sorted(m) for m in shown(reports)] == [sorted([first, second]), sorted(order)]
    # Without it, one report per method; the answers themselves are the same.
    one_each = list(service.iter_inspect(order, NORMALS, flat(200), defer_final_calibration=True))
    assert [len(m) for m in shown(one_each)] == [1, 2, 3]
    assert [o.result.score for o in one_each[-1].outcomes] == [o.result.score for o in reports[-1].outcomes]


def test_a_held_answer_still_comes_before_the_next_methods_error():
    service, order = fitted_service()
    first, second, _ = order

    def broken(batch):
        raise RuntimeError("the model broke")

    service.fitted(second, NORMALS)[0].detector._encode = broken
    steps = service.iter_inspect(order, NORMALS, flat(200), coalesce_within=answer_cost(second, 3, True))
    assert shown([next(steps)]) == [[first]]
    with pytest.raises(RuntimeError, match="the model broke"):
        next(steps)
    # A failure before any answer is held yields nothing first.
    service.fitted(first, NORMALS)[0].detector._encode = broken
    with pytest.raises(RuntimeError, match="the model broke"):
        next(service.iter_inspect(order, NORMALS, flat(200), coalesce_within=answer_cost(second, 3, True)))
