"""The vectorised record validation returns exactly what the first version returned.

``tests/reference_billing.py`` is the original per-value implementation, frozen.
Hypothesis builds batches of records with every kind of bad field (missing, wrong
type, blank, unknown status, not ISO-8601, out of range, pandas' special strings,
Unicode digits, unhashable JSON values) in small batches and in batches large enough
for the deduplicating fast paths, and both versions must agree on every record,
every reason and every timestamp.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditsync_pipeline import billing
import creditsync_pipeline.billing.records  # noqa: F401

from . import reference_billing

SENT = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
TIMESTAMPS = [
    "2026-05-01T00:00:00Z", "2026-06-30T23:59:59Z", "2026-05-01T10:00:00.123456+02:00", "2026-05-01",
    "2026-05-01T25:00:00Z", "2026-13-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
    "2262-04-11T23:47:17Z", "1677-09-21T00:12:42Z", " 2026-05-01", "2026", "20260501", "now", "today",
    "NaT", "", "²⁰²⁶-05-01", "٢٠٢٦-05-01T00:00:00Z", "2026-W01", "2026-05-01T00:00:00+25:00",
    None, 42, 3.5, True, [], {}, ["2026-05-01"], float("nan"),
]
PLAN_VALUES = ["pro", "team", "free", "", "   ", " pro", None, 7, True, [], {"x": 1}, "ü-plan"]
STATUS_VALUES = ["active", "trialing", "past_due", "canceled", "expired", "paused", "Active", "", None, 1, []]

record = st.fixed_dictionaries(
    {"instance_id": st.sampled_from(["a", "b", "ü", "x y"])},
    optional={
        "plan_id": st.sampled_from(PLAN_VALUES),
        "status": st.sampled_from(STATUS_VALUES),
        "current_period_end": st.sampled_from(TIMESTAMPS),
        "updated_at": st.sampled_from(TIMESTAMPS),
        "extra": st.just("ignored"),
    },
)


def _check(data: list[dict]) -> None:
    ids = [r["instance_id"] for r in data]
    pages = [(SENT + timedelta(seconds=i), 1) for i in range(len(data))]
    got_records, got_invalid = billing.records.validate_records(data, ids, pages)
    want_records, want_invalid = reference_billing._validate_records(data, ids, pages)
    pd.testing.assert_frame_equal(got_records, want_records)
    pd.testing.assert_frame_equal(got_invalid, want_invalid)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, max_size=40))
def test_small_batches_match_the_reference(data):
    _check(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, min_size=1, max_size=12), st.integers(600, 1500), st.randoms(use_true_random=False))
def test_large_batches_match_the_reference(sample, size, rnd):
    """Big enough for the fast paths (repeated values judged and parsed once)."""
    data = [dict(rnd.choice(sample)) for _ in range(size)]
    _check(data)


def test_a_realistic_batch_matches_the_reference():
    from creditsync_pipeline.simulators.generic import generate_records

    data = generate_records(25_000, seed=3)
    data[10]["updated_at"] = "yesterday"
    data[20]["current_period_end"] = "2026-02-30T00:00:00Z"
    data[30]["status"] = "paused"
    data[40]["plan_id"] = " "
    del data[50]["updated_at"]
    _check(data)
