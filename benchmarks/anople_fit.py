"""AnoPLe's fit costs in ``benchmarks.run``: the fast preset's fit against encoder forwards
of the same run (its fit budget) and the fit seconds of every preset."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from detector.methods.anople import AnoPLeDetector

from .measure import create, format_value, timed

ANOPLE = AnoPLeDetector.name

#: AnoPLe's faithful preset is timed on its first steps and extrapolated to its full schedule.
FAITHFUL_TIMED_STEPS = 20
#: AnoPLe's fit budget (issue 21): the fast preset's fit for k = 4, first fit of a fresh
#: detector included, costs at most this many image-encoder forwards of the same run.
ANOPLE_FIT_BUDGET_FORWARDS = 40.0
ANOPLE_RATIO_SHOTS = (1, 4, 8)
ENCODER_REPEATS = 5


def anople_fit_ratios(quick: bool, normals: list, encoder_input: Any) -> dict[str, Any]:
    """For k = 1, 4, 8: the first fit of a fresh fast-preset detector, divided by the median
    of ``ENCODER_REPEATS`` plain image-encoder forwards (``encode_image``, batch 1) measured
    right before it in the same process; also the fit's encode / train / memory split."""
    import torch

    table: dict[str, Any] = {}
    for k in ANOPLE_RATIO_SHOTS:
        det = create(ANOPLE, quick, **(dict(AnoPLeDetector.spec.quick_options) if quick else {}))
        encoder = det.backbone.model
        with torch.inference_mode():
            encoder.encode_image(encoder_input)  # warm-up
            encoder_times = [timed(lambda: encoder.encode_image(encoder_input)) for _ in range(ENCODER_REPEATS)]
        fit_s = timed(lambda: det.fit(normals[:k]))
        encoder_s = statistics.median(encoder_times)
        split = {key: det.fit_timings.get(key) for key in ("encode", "train", "memory")}
        table[f"k{k}"] = {
            "k": k,
            "fit_s": fit_s,
            "encoder_s": encoder_s,
            "encoder_all_s": encoder_times,
            "fit_to_encoder": fit_s / encoder_s,
            "split_s": split,
            "split_forwards": {key: (value / encoder_s if value is not None else None) for key, value in split.items()},
            "steps": det.config.steps,
        }
    table["budget_forwards"] = ANOPLE_FIT_BUDGET_FORWARDS
    table["k4_within_budget"] = table["k4"]["fit_to_encoder"] <= ANOPLE_FIT_BUDGET_FORWARDS
    return table


def anople_ratio_table(ratios: dict[str, Any]) -> str:
    lines = [
        "| AnoPLe fast fit (fresh detector) | fit (s) | encoder forward (s) | fit / encoder | encode / train / memory (forwards) |",
        "|---|---|---|---|---|",
    ]
    for key in (f"k{k}" for k in ANOPLE_RATIO_SHOTS):
        entry = ratios[key]
        split = " / ".join(format_value(v) for v in entry["split_forwards"].values())
        lines.append(
            f"| k = {entry['k']} ({entry['steps']} steps) | {format_value(entry['fit_s'])} | {format_value(entry['encoder_s'])} "
            f"| {format_value(entry['fit_to_encoder'])} | {split} |"
        )
    verdict = "met" if ratios["k4_within_budget"] else "NOT met"
    lines.append("")
    lines.append(f"Target fit / encoder <= {ratios['budget_forwards']:.0f} for k = 4: {verdict}.")
    return "\n".join(lines)


def anople_presets(quick: bool, normals: list) -> dict[str, Any]:
    """Fit seconds per AnoPLe preset for k = 1, 4, 8 (faithful: extrapolated)."""
    from detector.methods.anople.config import preset_config

    table: dict[str, Any] = {}
    for preset in ("fast", "text_only", "faithful"):
        full_steps = preset_config(preset).steps
        steps = min(full_steps, FAITHFUL_TIMED_STEPS) if preset == "faithful" else full_steps
        if quick:
            steps = min(steps, AnoPLeDetector.spec.quick_options["steps"])
        det = create(ANOPLE, quick, preset=preset, steps=steps)
        entry: dict[str, Any] = {"steps_timed": steps, "steps_full": full_steps if not quick else steps}
        for k in ((1,) if quick else (1, 4, 8)):
            seconds = timed(lambda: det.fit(normals[:k]))
            timing = det.describe().get("fit_seconds", {})
            if steps < entry["steps_full"] and timing:
                train = timing.get("train", 0.0)
                seconds = seconds - train + train * entry["steps_full"] / steps
                entry["extrapolated"] = True
            entry[f"k{k}_s"] = seconds
        table[preset] = entry
    return table


def anople_table(presets: dict[str, Any]) -> str:
    lines = ["| AnoPLe preset | steps | fit k=1 (s) | fit k=4 (s) | fit k=8 (s) | note |", "|---|---|---|---|---|---|"]
    for name, entry in presets.items():
        note = f"extrapolated from {entry['steps_timed']} steps" if entry.get("extrapolated") else "measured"
        lines.append(
            f"| {name} | {entry['steps_full']} | {format_value(entry.get('k1_s'))} | {format_value(entry.get('k4_s'))} "
            f"| {format_value(entry.get('k8_s'))} | {note} |"
        )
    return "\n".join(lines)


def anople_rows(quick: bool, normals: list, encoder_input: Any) -> dict[str, Any]:
    """The entries AnoPLe's benchmark row adds: its fit ratios and its presets' fit times."""
    return {"anople_fit_ratios": anople_fit_ratios(quick, normals, encoder_input), "anople_presets": anople_presets(quick, normals)}


#: method -> ``(quick, normals, encoder input) -> entries`` added to its benchmark row.
EXTRA_ROWS: dict[str, Callable[[bool, list, Any], dict[str, Any]]] = {ANOPLE: anople_rows}
