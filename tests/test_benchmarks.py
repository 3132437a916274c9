"""The benchmark command runs (``--quick``) and its table comes from measured values."""

from __future__ import annotations

import re
import json
import statistics
from pathlib import Path

import pytest

from benchmarks import anople_fit, measure
from benchmarks import run as bench
from benchmarks import served_app


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    code = bench.main(["--quick", "--methods", "inctrl", "faprompt", "--queries", "3", "--no-isolate", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_quick_run_has_every_column(quick_result):
    rows = {row["method"]: row for row in quick_result["rows"]}
    assert set(rows) == {"inctrl", "faprompt"}
    for row in rows.values():
        for key in ("construct_s", "fit_s", "predict_median_s", "predict_p90_s", "encoder_median_s",
                    "predict_to_encoder", "official_median_s", "speedup_vs_official", "peak_rss_mib", "threads"):
            assert key in row, key
        assert sorted(int(k) for k in row["fit_s"]) == [1, 2, 4, 8]
        assert row["backbone"] == "tiny-test"
    assert quick_result["all_loaded"]["peak_rss_mib"] > 0


def test_ratios_are_computed_from_measured_times(quick_result):
    for row in quick_result["rows"]:
        assert len(row["predict_all_s"]) == 3 and all(t > 0 for t in row["predict_all_s"])
        assert row["predict_median_s"] == pytest.approx(statistics.median(row["predict_all_s"]))
        assert row["encoder_median_s"] == pytest.approx(statistics.median(row["encoder_all_s"]))
        assert row["predict_to_encoder"] == pytest.approx(row["predict_median_s"] / row["encoder_median_s"])
        assert row["speedup_vs_official"] == pytest.approx(row["official_median_s"] / row["official_ours_median_s"])
        assert row["predict_p90_s"] >= row["predict_median_s"]


def test_official_pattern_rows_compute_the_same_scores(quick_result):
    rows = {row["method"]: row for row in quick_result["rows"]}
    assert rows["faprompt"]["mode"] == "learned"  # deep prompts and prior: the official configuration
    for row in rows.values():
        assert row["official_max_score_diff"] < 1e-5


def test_bf16_is_measured_separately_with_its_deviation(quick_result):
    rows = {row["method"]: row for row in quick_result["rows"]}
    bf16 = rows["faprompt"]["bf16"]
    assert bf16["predict_median_s"] == pytest.approx(statistics.median(bf16["predict_all_s"]))
    assert 0 < bf16["max_raw_map_diff"] < 0.2  # reduced precision changes the numbers, a little
    assert "bf16" not in rows["inctrl"]
    assert "precision=\"bf16\"" in bench.report(quick_result)


def test_faprompt_reference_arithmetic_equals_the_package_encoder():
    """The official-pattern vision forward (explicit attention matrices) and the full 77-token
    text forward give the package's numbers."""
    import torch

    from benchmarks.reference import official_vision_encoder
    from detector import create_detector

    det = create_detector("faprompt", backbone="tiny-test")
    images = torch.randn(2, 3, det.image_size, det.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = det.model.vision(images)
        theirs = official_vision_encoder(det)(images)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_markdown_table_lists_each_method(quick_result):
    table = bench.report(quick_result)
    header = table.splitlines()[0]
    assert "predict / encoder" in header and "speed-up" in header and "peak RSS" in header
    assert any(line.startswith("| inctrl |") for line in table.splitlines())
    assert "loaded at once" in table


def test_percentile_interpolates():
    assert measure.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)


def test_first_answer_benchmark_quick_prints_every_ratio(tmp_path, capsys):
    from benchmarks import first_answer

    out = tmp_path / "first_answer.json"
    assert first_answer.main(["--quick", "--in-process", "--threads", "1", "--repeats", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in (*first_answer.TARGETS, *first_answer.REPORTED):
        assert f"| {name} |" in text
    assert re.search(r"the final redraw came \d+\.\d+ s after the background calibration landed", text)
    assert "Driven in-process" in text and "F (tiny-test @ 96)" in text  # the encoders it timed, named
    # The repeated measurements: every run kept, the medians (of two: the lower one) count.
    result = json.loads(out.read_text())
    runs = result["repeats"]
    assert len(runs["second_query_all_s"]) == len(runs["prefetched_all_s"]) == len(runs["prefetch_s"]) == 2
    assert result["second_query_s"] == min(runs["second_query_all_s"])
    assert result["prefetched_all_s"] == min(runs["prefetched_all_s"])
    # F, B and P measured before and after the Runs: two predicts per method on each side.
    assert all(len(times) == 4 for times in result["plain_predict_all_s"].values())
    assert result["P_s"] == pytest.approx(sum(statistics.median(t) for t in result["plain_predict_all_s"].values()))
    drift = result["drift"]
    assert result["F_s"] == pytest.approx((drift["before"]["F_s"] + drift["after"]["F_s"]) / 2)
    assert drift["before"]["P_s"] > 0 and drift["after"]["P_s"] > 0
    assert "Each run / P" in text and "measured before and after the Runs" in text
    # Each Run's own predicts (what its summary reported) are inside its time, never more.
    for key in ("second_query", "prefetched"):
        for total, predicts in zip(runs[f"{key}_all_s"], runs[f"{key}_own_predicts_s"]):
            assert 0 < predicts <= total
    assert result["ratios"]["second_query / own predicts"] >= 1.0
    assert "Each run / its own predicts" in text


@pytest.mark.browser
@pytest.mark.skipif(not served_app.browser_available(), reason=f"{served_app.CHROMIUM} or playwright is missing")
def test_first_answer_benchmark_drives_the_served_app_in_chromium(tmp_path, capsys):
    """The default measurement: ``python app.py`` in a subprocess, driven through the page."""
    from benchmarks import first_answer

    out = tmp_path / "first_answer.json"
    assert first_answer.main(["--quick", "--threads", "1", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["driver"] == "browser"
    assert 0 < result["cold_first_s"] <= result["cold_all_s"] <= result["cold_final_s"]
    assert result["prefetched_all_s"] > 0 and result["second_query_s"] > 0 and result["prefetch_s"] > 0
    assert result["warm_ready_s"] >= result["server_start_s"] > 0
    assert result["ratios"]["cold_first / B"] == pytest.approx(result["cold_first_s"] / result["B_s"])
    assert result["ratios"]["second_query / P"] == pytest.approx(result["second_query_s"] / result["P_s"])
    assert len(result["repeats"]["second_query_all_s"]) == len(result["repeats"]["prefetched_all_s"]) == 2
    assert result["drift"]["after"]["P_s"] > 0  # P measured again once the server is closed
    for run in ("cold", "second", "prefetched"):
        assert result["cpu_s"][run]["server"] > 0  # read from /proc for the app's own process
    # The predict seconds read from the verdicts lie inside each Run's time.
    for total, predicts in zip(result["repeats"]["prefetched_all_s"], result["repeats"]["prefetched_own_predicts_s"]):
        assert 0 < predicts <= total
    text = capsys.readouterr().out
    assert "Driven in a browser" in text and "| prefetched_all / P |" in text and "CPU seconds" in text


def test_anople_fit_ratios_come_from_one_run(tmp_path):
    """AnoPLe's fit budget: the first fit of a fresh detector for k = 1, 4, 8, each divided by
    encoder forwards measured in the same run (quick: tiny-test, 3 steps)."""
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--methods", "anople", "--queries", "2", "--no-isolate", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    ratios = row["anople_fit_ratios"]
    for k in (1, 4, 8):
        entry = ratios[f"k{k}"]
        assert entry["k"] == k and len(entry["encoder_all_s"]) == anople_fit.ENCODER_REPEATS
        assert entry["encoder_s"] == pytest.approx(statistics.median(entry["encoder_all_s"]))
        assert entry["fit_to_encoder"] == pytest.approx(entry["fit_s"] / entry["encoder_s"])
        assert 0 < sum(entry["split_s"].values()) <= entry["fit_s"]
    assert ratios["k4_within_budget"] == (ratios["k4"]["fit_to_encoder"] <= anople_fit.ANOPLE_FIT_BUDGET_FORWARDS)
    assert "fit / encoder" in bench.report(json.loads(out.read_text()))


def test_benchmarked_configurations_come_from_what_each_method_declares(tmp_path):
    from detector import create_detector
    from detector.registry import get_method, list_methods

    files = measure.benchmarked_checkpoints(True, tmp_path)
    assert files  # at least one method runs a cheaper mode without a file of its learned parts
    for method in list_methods():
        cls = get_method(method)
        artefacts = cls.artefacts()
        assert (method in files) == (artefacts is not None and artefacts.write_random is not None)
        options = measure.method_options(method, True, tmp_path / method)
        assert {k: v for k, v in options.items() if k != "checkpoint"} == dict(cls.spec.quick_options)
        assert ("checkpoint" in options) == (method in files)
    for method, path in files.items():  # each file is one its method loads
        det = create_detector(method, backbone="tiny-test", backbone_weights="random", checkpoint=path)
        assert det.describe()["checkpoint_file"] == path


@pytest.mark.slow
def test_the_full_configuration_adds_nothing_but_the_learned_state_on_the_default_backbone(tmp_path):
    from detector.registry import list_methods

    for method in list_methods():  # the test above ties a tiny file to what the method declares
        tiny = measure.random_learned_state(method, True, tmp_path / f"{method}-tiny")
        options = measure.method_options(method, False, tmp_path / method)
        assert set(options) == (set() if tiny is None else {"checkpoint"})
        if tiny is not None:  # written for the method's default backbone, so larger than the tiny one's
            assert Path(options["checkpoint"]).stat().st_size > tiny.stat().st_size


def test_a_spec_rejects_quick_options_it_does_not_have():
    from detector.spec import MethodSpec, Option

    with pytest.raises(ValueError, match="quick_options"):
        MethodSpec("Toy", "tiny-test", "random", "squash", 1.0, options={"steps": Option(3, kind=int)}, quick_options={"rounds": 1})
    assert MethodSpec("Toy", "tiny-test", "random", "squash", 1.0, options={"steps": Option(3, kind=int)}, quick_options={"steps": 1}).quick_options == {"steps": 1}


def test_app_memory_benchmark_follows_the_cache_until_it_is_full(tmp_path, capsys):
    from benchmarks import app_memory
    from detector import limits
    from detector.registry import list_methods

    methods = len(list_methods())
    sets_to_fill = -(-limits.FITTED_DETECTOR_CACHE_SIZE // methods)  # with the first set's fits
    out = tmp_path / "memory.json"
    assert app_memory.main(["--quick", "--same", "2", "--new", str(sets_to_fill + 1), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["phase"] for row in rows] == ["warm", "same", "same"] + ["new"] * (sets_to_fill + 1)
    assert result["cache_size"] == limits.FITTED_DETECTOR_CACHE_SIZE
    # the same normals: one fit per method; each new set adds its own until the cache is full
    expected = [methods, methods] + [min(methods * (2 + i), limits.FITTED_DETECTOR_CACHE_SIZE) for i in range(sets_to_fill + 1)]
    assert [row["cached_fits"] for row in rows[1:]] == expected
    assert all(row["rss_mib"] > 0 and row["tensor_mib"] > 0 for row in rows)
    full = [row for row in rows if row["phase"] == "new" and row["cached_fits"] == limits.FITTED_DETECTOR_CACHE_SIZE]
    assert len(full) >= 2
    growth = result["growth_per_run"]["new normals, cache full"]
    assert growth["rss_mib"] == pytest.approx((full[-1]["rss_mib"] - full[0]["rss_mib"]) / (len(full) - 1))
    assert f"| new | {sets_to_fill + 1} |" in capsys.readouterr().out
