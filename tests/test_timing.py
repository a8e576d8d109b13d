"""Where a run's time goes: spans per step and kind of work, and their rates."""

from __future__ import annotations

import time

import pytest

from stagewise import timing


def test_spans_nest_and_keep_their_own_time():
    with timing.recording() as recorded:
        with timing.step("stage 2"):
            with timing.span("train", "model", items=100, unit="pairs"):
                time.sleep(0.02)
                with timing.span("dev-eval", "dev", 1, "evaluations"):
                    time.sleep(0.03)
    breakdown = recorded.breakdown()
    train, dev = breakdown["by_kind"]["train"], breakdown["by_kind"]["dev-eval"]
    assert dev["seconds"] >= 0.03 and 0.02 <= train["seconds"] < 0.03 + 0.02  # the evaluation is not training's
    assert train["items"] == 100 and train["unit"] == "pairs" and train["rate"] == pytest.approx(100 / train["seconds"],
                                                                                                   rel=0.05)
    assert set(breakdown["by_step"]) == {"stage 2"}
    assert {row["kind"] for row in breakdown["spans"]} == {"train", "dev-eval"}


def test_a_span_outside_a_recording_is_not_kept_and_recordings_nest():
    with timing.span("encode", "x", 5):
        pass
    with timing.recording() as outer:
        with timing.recording() as inner:
            with timing.span("encode", "x", 5, "docs"):
                pass
        with timing.span("score", "y", 7, "pairs"):
            pass
    assert set(inner.breakdown()["by_kind"]) == {"encode"}
    assert set(outer.breakdown()["by_kind"]) == {"encode", "score"}


def test_a_kind_done_by_several_models_has_no_rate_of_its_own():
    with timing.recording() as recorded:
        with timing.span("encode", "fast model", 1000, "docs"):
            time.sleep(0.01)
        with timing.span("encode", "slow model", 10, "docs"):
            time.sleep(0.02)
        with timing.span("score", "one model", 50, "pairs"):
            time.sleep(0.01)
    breakdown = recorded.breakdown()
    encode, score = breakdown["by_kind"]["encode"], breakdown["by_kind"]["score"]
    assert encode["items"] == 1010 and "rate" not in encode  # a blend of two models' rates would mean nothing
    assert score["rate"] == pytest.approx(50 / score["seconds"], rel=0.05)
    assert {r["what"]: r["items"] for r in breakdown["spans"] if r["kind"] == "encode"} == {"fast model": 1000,
                                                                                            "slow model": 10}
