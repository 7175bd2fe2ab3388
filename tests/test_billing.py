"""BillingClient against the real HTTP simulator (plus a mock transport for rare edges)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditsync_pipeline.billing import (
    INVALID_COLUMNS,
    RECORD_COLUMNS,
    STATUSES,
    BillingAuthError,
    BillingClient,
    BillingError,
    BillingMalformedError,
    BillingSnapshot,
    BillingUnavailableError,
)
from creditsync_pipeline.billing.http import parse_retry_after as _parse_retry_after
from creditsync_pipeline.ids import instance_id_problem
from creditsync_pipeline.simulators.generic import BillingSimulator

TOKEN = "tok-SECRET-9d2c71f0"
ODD_IDS = [
    "a/b",
    "100%",
    "%2F",
    "q?x=1&y=2",
    "frag#ment",
    "quote'\"s",
    "with space",
    "plus+sign",
    "ünïcødé-✓",
    "日本語/エ",
    "..",
    ".",
    "~tilde",
]


def rec(instance_id: str, plan_id: str = "pro", status: str = "active", **extra: object) -> dict:
    base = {
        "instance_id": instance_id,
        "plan_id": plan_id,
        "status": status,
        "current_period_end": "2030-01-31T00:00:00Z",
        "updated_at": "2024-05-01T12:00:00Z",
    }
    base.update(extra)
    return base


def many(n: int) -> list[dict]:
    plans = ["free", "starter", "pro", "enterprise"]
    return [
        rec(
            f"inst-{i:05d}",
            plan_id=plans[i % 4],
            status=STATUSES[i % 5],
            current_period_end=None if i % 3 == 0 else f"2030-{1 + i % 12:02d}-15T08:30:00+02:00",
            updated_at=f"2024-{1 + i % 12:02d}-01T00:00:{i % 60:02d}Z",
        )
        for i in range(n)
    ]


@pytest.fixture
def sim() -> Iterator[BillingSimulator]:
    with BillingSimulator(token=TOKEN) as s:
        yield s


class SleepRecorder:
    """Stands in for time.sleep inside the client's tenacity loop: records, never sleeps."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def make_client(sim: BillingSimulator, sleeps: SleepRecorder) -> Iterator[Callable[..., BillingClient]]:
    clients: list[BillingClient] = []

    def factory(**kwargs: object) -> BillingClient:
        options: dict[str, object] = {"backoff_initial": 0.01, "backoff_max": 0.05, "max_attempts": 3}
        options.update(kwargs)
        base_url = options.pop("base_url", sim.base_url)
        token = options.pop("token", TOKEN)
        client = BillingClient(base_url, token, **options)  # type: ignore[arg-type]
        client.api.sleep = sleeps
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def expected_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    for column in ("instance_id", "plan_id", "status"):
        frame[column] = frame[column].astype(object)
    for column in ("current_period_end", "updated_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601").astype("datetime64[ns, UTC]")
    return frame[["instance_id", "plan_id", "status", "current_period_end", "updated_at"]]


def assert_one_line_no_token(exc: BaseException) -> None:
    for text in (str(exc), repr(exc)):
        assert TOKEN not in text
        assert "\n" not in text


# -- full list -------------------------------------------------------------------------------


def test_fetch_all_many_pages_equals_simulator(sim: BillingSimulator, make_client) -> None:
    data = many(2345)
    sim.set_records(data)
    client = make_client(page_size=100)
    before = datetime.now(timezone.utc)
    snap = client.fetch_all()
    after = datetime.now(timezone.utc)

    assert isinstance(snap, BillingSnapshot)
    assert snap.pages == 24 == sim.request_count("list")
    assert snap.requested_ids is None
    assert list(snap.records.columns) == RECORD_COLUMNS
    assert list(snap.invalid.columns) == INVALID_COLUMNS
    assert snap.invalid.empty
    assert len(snap.records) == 2345
    pd.testing.assert_frame_equal(
        snap.records[RECORD_COLUMNS[:-1]].reset_index(drop=True), expected_frame(sim.records()), check_dtype=True
    )
    for column in ("current_period_end", "updated_at", "observed_at"):
        assert str(snap.records[column].dtype) == "datetime64[ns, UTC]"
    for column in ("instance_id", "plan_id", "status"):
        assert all(type(v) is str for v in snap.records[column])
    assert snap.records["current_period_end"].isna().sum() == len([r for r in data if r["current_period_end"] is None])
    assert before <= snap.started_at <= snap.finished_at <= after
    assert snap.started_at.tzinfo is not None and snap.started_at.utcoffset() == timedelta(0)
    observed = snap.records["observed_at"]
    assert observed.is_monotonic_increasing
    assert observed.nunique() == 24  # one timestamp per page request
    assert observed.min() >= pd.Timestamp(snap.started_at) and observed.max() <= pd.Timestamp(snap.finished_at)


def test_fetch_all_sends_bearer_and_page_size(make_client) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [rec("a")], "next_cursor": None})

    client = make_client(base_url="https://billing.example/api", transport=httpx.MockTransport(handler), page_size=250)
    snap = client.fetch_all()
    assert len(snap.records) == 1
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert seen[0].url.path == "/api/v1/subscriptions"
    assert seen[0].url.params["limit"] == "250" and "cursor" not in seen[0].url.params


def test_empty_list_has_typed_empty_frames(make_client) -> None:
    snap = make_client().fetch_all()
    assert snap.pages == 1
    assert snap.records.empty and list(snap.records.columns) == RECORD_COLUMNS
    assert str(snap.records["updated_at"].dtype) == "datetime64[ns, UTC]"
    assert snap.invalid.empty and list(snap.invalid.columns) == INVALID_COLUMNS


def test_timestamps_naive_means_utc_and_offsets_converted(sim: BillingSimulator, make_client) -> None:
    sim.set_records([
        rec("a", updated_at="2024-05-01T10:00:00", current_period_end="2030-01-01T02:00:00+02:00"),
        rec("b", updated_at="2024-05-01T10:00:00.123456Z", current_period_end=None),
        rec("c", updated_at="2024-05-01", current_period_end="9999-12-31T23:59:59Z"),
    ])
    records = make_client().fetch_all().records.set_index("instance_id")
    assert records.loc["a", "updated_at"] == pd.Timestamp("2024-05-01T10:00:00Z")
    assert records.loc["a", "current_period_end"] == pd.Timestamp("2030-01-01T00:00:00Z")
    assert pd.isna(records.loc["b", "current_period_end"])
    assert records.loc["b", "updated_at"].microsecond == 123456
    # Far-future period ends ("forever") stay valid and in the future.
    assert records.loc["c", "current_period_end"] > pd.Timestamp("2200-01-01T00:00:00Z")


def test_extra_fields_ignored(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec("a", customer={"email": "x@y.z"}, amount=12, quantity=None)])
    snap = make_client().fetch_all()
    assert list(snap.records.columns) == RECORD_COLUMNS
    assert snap.invalid.empty and len(snap.records) == 1


# -- validation ------------------------------------------------------------------------------


def test_invalid_records_go_to_invalid_frame(sim: BillingSimulator, make_client) -> None:
    good = [rec(f"good-{i}") for i in range(5)]
    bad = [
        rec("bad-status", status="paused"),
        rec("bad-plan-empty", plan_id=""),
        rec("bad-plan-type", plan_id=7),
        {k: v for k, v in rec("bad-no-updated").items() if k != "updated_at"},
        rec("bad-updated", updated_at="yesterday"),
        rec("bad-updated-null", updated_at=None),
        rec("bad-updated-now", updated_at="now"),
        rec("bad-period", current_period_end="soon"),
        rec("bad-period-num", current_period_end=1700000000),
        rec("bad-two", status="Active", plan_id=None),
    ]
    sim.set_records(good + bad)
    snap = make_client(page_size=4).fetch_all()
    assert sorted(snap.records["instance_id"]) == sorted(r["instance_id"] for r in good)
    reasons = dict(zip(snap.invalid["instance_id"], snap.invalid["reason"]))
    assert set(reasons) == {r["instance_id"] for r in bad}
    assert reasons["bad-status"] == "unknown status 'paused'"
    assert reasons["bad-plan-empty"] == "empty plan_id"
    assert "plan_id" in reasons["bad-plan-type"]
    assert reasons["bad-no-updated"] == "missing updated_at"
    assert reasons["bad-updated-null"] == "missing updated_at"
    assert "updated_at is not ISO-8601" in reasons["bad-updated"]
    assert "updated_at is not ISO-8601" in reasons["bad-updated-now"]
    assert "current_period_end is not ISO-8601" in reasons["bad-period"]
    assert "current_period_end" in reasons["bad-period-num"]
    assert "unknown status 'Active'" in reasons["bad-two"] and "missing plan_id" in reasons["bad-two"]
    assert all(type(v) is str for v in snap.invalid["reason"])


@pytest.mark.parametrize(
    "broken",
    [
        {"plan_id": "pro", "status": "active", "updated_at": "2024-01-01T00:00:00Z"},
        rec(""),
        rec("x" * 257),
        {**rec("x"), "instance_id": 42},
        {**rec("x"), "instance_id": None},
        ["not", "an", "object"],
        "just a string",
    ],
    ids=["missing", "empty", "too-long", "int", "null", "list", "string"],
)
def test_record_without_usable_instance_id_fails_the_fetch(sim: BillingSimulator, make_client, broken) -> None:
    sim.set_records([rec(f"ok-{i}") for i in range(10)])
    sim.upsert(broken, key="ok-5a")  # lands on page 2 of 3
    client = make_client(page_size=4)
    with pytest.raises(BillingMalformedError) as info:
        client.fetch_all()
    assert str(info.value).startswith("billing API response malformed: GET /v1/subscriptions (page 2): unusable record")
    assert_one_line_no_token(info.value)
    # Not retried; page 3 (the last) may already have been fetched ahead, never used.
    assert sim.request_count("list") in (2, 3)


def test_max_length_instance_id_is_fine(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec("x" * 256)])
    assert make_client().fetch_all().records["instance_id"].tolist() == ["x" * 256]


# -- faults ----------------------------------------------------------------------------------


def test_rate_limit_waits_exactly_retry_after(sim: BillingSimulator, make_client, sleeps, caplog) -> None:
    sim.set_records(many(30))
    sim.add_fault("rate_limit", endpoint="list", after=1, retry_after=1)
    caplog.set_level(logging.WARNING, logger="creditsync.billing")
    snap = make_client(page_size=10).fetch_all()
    assert len(snap.records) == 30
    assert sleeps.calls == [1.0]
    assert sim.request_count("list") == 4  # 3 pages + 1 retried
    assert "HTTP 429" in caplog.text and "retrying in 1.0s (attempt 2/3)" in caplog.text


def test_retry_after_capped_by_max_retry_after(sim: BillingSimulator, make_client, sleeps) -> None:
    sim.add_fault("rate_limit", retry_after=600)
    make_client(max_retry_after=2.5).fetch_all()
    assert sleeps.calls == [2.5]


@pytest.mark.parametrize("header", [None, "soon", "-3", ""])
def test_missing_or_garbled_retry_after_uses_backoff(sim: BillingSimulator, make_client, sleeps, header) -> None:
    sim.add_fault("rate_limit", retry_after=header)
    make_client(backoff_initial=0.01, backoff_max=0.05).fetch_all()
    assert len(sleeps.calls) == 1
    assert 0.01 <= sleeps.calls[0] <= 0.05


def test_parse_retry_after() -> None:
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(" 2.5 ") == 2.5
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after("-1") is None
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (_parse_retry_after(future) or 0) <= 31
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert _parse_retry_after(past) == 0.0


def test_persistent_429_raises_unavailable(sim: BillingSimulator, make_client, sleeps) -> None:
    sim.add_fault("rate_limit", retry_after=1, count=None)
    with pytest.raises(BillingUnavailableError) as info:
        make_client(max_attempts=4).fetch_all()
    assert str(info.value) == (
        "billing API unavailable: GET /v1/subscriptions (page 1) failed after 4 attempts: HTTP 429"
    )
    assert sleeps.calls == [1.0, 1.0, 1.0]
    assert sim.request_count("list") == 4


def test_500_then_success(sim: BillingSimulator, make_client, sleeps) -> None:
    sim.set_records(many(25))
    sim.add_fault("error", count=2)
    snap = make_client(page_size=10).fetch_all()
    assert len(snap.records) == 25 and snap.pages == 3
    assert sim.request_count("list") == 5
    assert len(sleeps.calls) == 2
    assert sleeps.calls[0] <= 0.02 + 1e-9 and sleeps.calls[1] <= 0.03 + 1e-9  # exponential: 0.01, 0.02 (+jitter)


def test_the_fetcher_stops_a_few_pages_past_a_bad_one(sim: BillingSimulator, make_client) -> None:
    from creditsync_pipeline.billing.generic import _PREFETCH_PAGES

    sim.set_records(many(80))  # 20 pages of 4
    sim.upsert({**rec("x"), "instance_id": ""}, key="inst-00005a")  # page 2
    with pytest.raises(BillingMalformedError, match=r"\(page 2\): unusable record"):
        make_client(page_size=4).fetch_all()
    # Pages already queued for the consumer plus the one in the fetcher's hand; none used.
    assert sim.request_count("list") <= 2 + _PREFETCH_PAGES + 1 < 20


def _paged_transport(pages: dict[str | None, bytes], calls: list[str | None]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        calls.append(cursor)
        return httpx.Response(200, content=pages[cursor], headers={"Content-Type": "application/json"})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "layout",
    [
        '{{"next_cursor": {cursor}, "data": {data}}}',  # cursor first: nothing to read off the end
        '{{"data": {data}, "next_cursor": {cursor}, "has_more": true}}',  # cursor not last
        '{{"data": {data}, "next_cursor": {cursor}}}\n\n',  # cursor last, trailing whitespace
    ],
    ids=["cursor-first", "cursor-middle", "cursor-last"],
)
def test_pages_follow_the_parsed_cursor_whatever_the_key_order(make_client, layout: str) -> None:
    records = many(9)
    names: list[str | None] = [None, 'c\\"1', "c/2"]  # an escaped quote: only the parsed value knows it
    pages: dict[str | None, bytes] = {}
    for k, name in enumerate(names):
        nxt = names[k + 1] if k + 1 < len(names) else None
        pages[name] = layout.format(
            cursor=json.dumps(nxt), data=json.dumps(records[3 * k : 3 * k + 3])
        ).encode()
    calls: list[str | None] = []
    client = make_client(base_url="https://billing.example", transport=_paged_transport(pages, calls))
    snapshot = client.fetch_all()
    assert calls == names
    assert list(snapshot.records["instance_id"]) == [r["instance_id"] for r in records]
    assert snapshot.pages == 3


def test_a_failure_while_validating_stops_the_page_fetcher(
    sim: BillingSimulator, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from creditsync_pipeline.billing import generic as billing_module

    sim.set_records(many(400))  # 100 pages of 4

    def explode(*args: object) -> None:
        raise RuntimeError("validation blew up")

    monkeypatch.setattr(billing_module, "_VALIDATE_BATCH", 8)
    monkeypatch.setattr(billing_module, "validate_fields", explode)
    with pytest.raises(RuntimeError, match="validation blew up"):
        make_client(page_size=4).fetch_all()
    # Two pages validated, a few more prefetched at most; then the fetcher is gone.
    assert sim.request_count("list") <= 2 + billing_module._PREFETCH_PAGES + 2
    assert not [t for t in threading.enumerate() if t.name == "billing-pages"]


def test_a_failed_page_does_not_wait_out_the_fetchers_retry_after(
    sim: BillingSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page 1 turns out malformed while the fetcher sleeps on page 2's 429: the sleep is cut short."""
    from creditsync_pipeline.billing import generic as billing_module
    from creditsync_pipeline.billing.http import HttpApi

    sim.set_records(many(12))
    sim.upsert({**rec("x"), "instance_id": ""}, key="inst-00000a")  # page 1
    sim.add_fault("rate_limit", endpoint="list", after=1, count=None, retry_after=300)
    pausing = threading.Event()
    real_pause, real_record_ids = HttpApi._pause, billing_module.record_ids

    def pause(self: HttpApi, seconds: float, cancel: threading.Event | None) -> None:
        pausing.set()
        real_pause(self, seconds, cancel)

    def record_ids(data: list) -> list:
        assert pausing.wait(30), "the fetcher never paused on page 2's 429"
        return real_record_ids(data)  # page 1's bad record fails the fetch now

    monkeypatch.setattr(HttpApi, "_pause", pause)
    monkeypatch.setattr(billing_module, "record_ids", record_ids)
    outcome: list[BaseException] = []

    def run() -> None:
        with BillingClient(sim.base_url, TOKEN, page_size=4, max_retry_after=300) as client:
            try:
                client.fetch_all()
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)  # a liveness bound, 5x under the Retry-After the fetcher sleeps on
    assert not worker.is_alive(), "fetch_all waited out the fetcher's Retry-After"
    (error,) = outcome
    assert isinstance(error, BillingMalformedError) and "(page 1): unusable record" in str(error)
    assert not [t for t in threading.enumerate() if t.name == "billing-pages"]


def test_persistent_500_mid_list_raises(sim: BillingSimulator, make_client) -> None:
    sim.set_records(many(50))
    sim.add_fault("error", endpoint="list", after=2, count=None)
    with pytest.raises(BillingUnavailableError) as info:
        make_client(page_size=10, max_attempts=5).fetch_all()
    assert str(info.value) == (
        "billing API unavailable: GET /v1/subscriptions (page 3) failed after 5 attempts: HTTP 500"
    )
    assert sim.request_count("list") == 2 + 5
    assert_one_line_no_token(info.value)


def test_dropped_connection_is_retried(sim: BillingSimulator, make_client) -> None:
    sim.set_records(many(15))
    sim.add_fault("drop", after=1)
    snap = make_client(page_size=10).fetch_all()
    assert len(snap.records) == 15
    assert sim.request_count("list") == 3


def test_persistent_drop_raises_unavailable(sim: BillingSimulator, make_client) -> None:
    sim.add_fault("drop", count=None)
    with pytest.raises(BillingUnavailableError) as info:
        make_client().fetch_all()
    assert "failed after 3 attempts: connection failed (RemoteProtocolError)" in str(info.value)


def test_slow_response_times_out_and_is_retried(sim: BillingSimulator, make_client, sleeps) -> None:
    sim.set_records(many(5))
    sim.add_fault("slow", delay=0.6)
    snap = make_client(timeout=0.15).fetch_all()
    assert len(snap.records) == 5
    assert sim.request_count("list") == 2
    assert len(sleeps.calls) == 1


def test_persistent_timeout_raises_unavailable(sim: BillingSimulator, make_client) -> None:
    sim.add_fault("slow", delay=0.3, count=None)
    with pytest.raises(BillingUnavailableError) as info:
        make_client(timeout=0.1, max_attempts=2).fetch_all()
    assert "failed after 2 attempts: timed out (ReadTimeout)" in str(info.value)


def test_connection_refused_raises_unavailable_without_userinfo(make_client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_client(base_url=f"http://admin:hunter2@127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(BillingUnavailableError) as info:
        client.fetch_all()
    message = str(info.value)
    assert "connection failed (ConnectError)" in message and f"127.0.0.1:{port}" in message
    assert "hunter2" not in message and "admin" not in message
    assert "hunter2" not in repr(client)


def test_userinfo_never_overrides_bearer(sim: BillingSimulator, make_client) -> None:
    host = sim.base_url.removeprefix("http://")
    client = make_client(base_url=f"http://user:pw@{host}")
    sim.set_records([rec("a")])
    assert len(client.fetch_all().records) == 1  # the simulator only accepts the bearer token


def test_malformed_html_page_fails_without_retry(sim: BillingSimulator, make_client) -> None:
    sim.set_records(many(15))
    sim.add_fault("malformed", after=1)
    with pytest.raises(BillingMalformedError) as info:
        make_client(page_size=10).fetch_all()
    assert str(info.value) == (
        "billing API response malformed: GET /v1/subscriptions (page 2): "
        "non-JSON body (HTTP 200, content-type text/html)"
    )
    assert sim.request_count("list") == 2


def test_bad_shape_page_fails(sim: BillingSimulator, make_client) -> None:
    sim.add_fault("bad_shape")
    with pytest.raises(BillingMalformedError, match="no 'data' list"):
        make_client().fetch_all()
    assert sim.request_count("list") == 1


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"data": {}, "next_cursor": None},
        {"data": []},
        {"data": [], "next_cursor": 5},
        {"data": [], "next_cursor": ""},
        "null",
    ],
)
def test_page_shape_edges(make_client, body) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=content))
    with pytest.raises(BillingMalformedError):
        make_client(base_url="https://billing.example", transport=transport).fetch_all()


def test_repeated_cursor_is_malformed(make_client) -> None:
    pages = {
        None: {"data": [rec("a")], "next_cursor": "c1"},
        "c1": {"data": [rec("b")], "next_cursor": "c2"},
        "c2": {"data": [rec("c")], "next_cursor": "c1"},
    }
    calls: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        calls.append(cursor)
        return httpx.Response(200, json=pages[cursor])

    client = make_client(base_url="https://billing.example", transport=httpx.MockTransport(handler))
    with pytest.raises(BillingMalformedError, match="repeats an earlier cursor"):
        client.fetch_all()
    assert calls == [None, "c1", "c2"]


def test_bad_token_is_auth_error_not_retried(sim: BillingSimulator, make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(token="wrong-token")
    with pytest.raises(BillingAuthError) as info:
        client.fetch_all()
    assert str(info.value) == "billing API rejected the token (HTTP 401)"
    assert sim.request_count() == 1
    with pytest.raises(BillingAuthError):
        client.fetch_instances(["a", "b"])
    assert "wrong-token" not in caplog.text


def test_403_is_auth_error(make_client) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(403, json={"error": "forbidden"}))
    with pytest.raises(BillingAuthError, match=r"HTTP 403"):
        make_client(base_url="https://billing.example", transport=transport).fetch_all()


@pytest.mark.parametrize("status,cls", [(400, BillingError), (404, BillingMalformedError), (302, BillingMalformedError)])
def test_other_statuses(make_client, status, cls) -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(status, json={"error": "bad_thing"}, headers={"Location": "/elsewhere"})
    )
    with pytest.raises(cls) as info:
        make_client(base_url="https://billing.example", transport=transport).fetch_all()
    assert f"HTTP {status}" in str(info.value)
    assert not isinstance(info.value, (BillingAuthError, BillingUnavailableError))


# -- targeted fetch --------------------------------------------------------------------------


def test_fetch_instances_with_404s_and_dedupe(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec("a", plan_id="pro"), rec("b", plan_id="starter", status="canceled")])
    before = datetime.now(timezone.utc)
    snap = make_client().fetch_instances(["b", "missing", "a", "b", "a"])
    assert snap.requested_ids == ("b", "missing", "a")
    assert snap.records["instance_id"].tolist() == ["b", "a"]  # request order
    assert snap.records["plan_id"].tolist() == ["starter", "pro"]
    assert snap.invalid.empty
    assert snap.pages == 2
    assert sim.request_count("one") == 3
    assert snap.started_at >= before
    assert (snap.records["observed_at"] >= pd.Timestamp(snap.started_at)).all()
    assert str(snap.records["observed_at"].dtype) == "datetime64[ns, UTC]"


def test_fetch_instances_empty(make_client, sim: BillingSimulator) -> None:
    snap = make_client().fetch_instances([])
    assert snap.requested_ids == () and snap.records.empty and snap.pages == 0
    assert sim.request_count() == 0


def test_fetch_instances_odd_ids(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec(i, plan_id=f"plan-{n}") for n, i in enumerate(ODD_IDS)])
    snap = make_client(concurrency=4).fetch_instances(ODD_IDS + ["a/b/c", "100%25"])
    assert snap.records["instance_id"].tolist() == ODD_IDS
    assert snap.records["plan_id"].tolist() == [f"plan-{n}" for n in range(len(ODD_IDS))]
    assert snap.invalid.empty


def test_fetch_instances_record_for_another_instance(sim: BillingSimulator, make_client) -> None:
    sim.upsert(rec("someone-else"), key="mine")
    sim.upsert(rec("ok", status="paused"))
    snap = make_client().fetch_instances(["mine", "ok"])
    assert snap.records.empty
    reasons = dict(zip(snap.invalid["instance_id"], snap.invalid["reason"]))
    assert reasons["mine"].startswith("billing returned a record for another instance")
    assert reasons["ok"] == "unknown status 'paused'"


def unresolved(snap: BillingSnapshot) -> dict[str, tuple[str, str]]:
    return {str(r.instance_id): (str(r.status), str(r.reason)) for r in snap.unresolved.itertuples(index=False)}


def test_an_unusable_answer_leaves_only_that_instance_alone(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec("ok")])
    sim.upsert({"plan_id": "pro", "status": "active"}, key="x")
    snap = make_client().fetch_instances(["x", "ok"])
    assert snap.records["instance_id"].tolist() == ["ok"]
    status, reason = unresolved(snap)["x"]
    assert status == "error" and "missing instance_id" in reason
    sim.add_fault("bad_shape", endpoint="one")
    status, reason = unresolved(make_client().fetch_instances(["y"]))["y"]
    assert status == "error" and "expected a record object, got array" in reason


@pytest.mark.parametrize(
    "body, content_type",
    [
        ("<html><body>Not Found</body></html>", "text/html"),  # a web server's page
        ('{"detail": "Not Found"}', "application/json"),  # a framework's 404 during a deploy
        ('{"message": "no Route matched with those values"}', "application/json"),  # a gateway's
        ('{"error": "not_found"}', "application/json"),  # another code
        ("{}", "application/json"),
    ],
)
def test_only_subscription_not_found_means_no_subscription(make_client, body: str, content_type: str) -> None:
    """SPEC "Billing API": any other 404 is an error -- the instance is left alone, never sent to free."""
    transport = httpx.MockTransport(
        lambda request: httpx.Response(404, content=body.encode(), headers={"Content-Type": content_type})
    )
    snap = make_client(base_url="https://billing.example", transport=transport).fetch_instances(["a", "b"])
    assert snap.records.empty
    assert {i: s for i, (s, _) in unresolved(snap).items()} == {"a": "error", "b": "error"}
    assert "HTTP 404 without" in unresolved(snap)["a"][1]
    ok = httpx.MockTransport(lambda request: httpx.Response(404, json={"error": "subscription_not_found"}))
    snap = make_client(base_url="https://billing.example", transport=ok).fetch_instances(["a"])
    assert snap.records.empty and snap.unresolved.empty  # absent: no subscription at all


def test_a_wrong_base_url_is_never_no_subscription(sim: BillingSimulator, make_client) -> None:
    # A wrong base URL: the server's HTML 404 must never read as "no subscription".
    snap = make_client(base_url=sim.base_url + "/typo").fetch_instances(["a"])
    status, reason = unresolved(snap)["a"]
    assert status == "error" and "is BILLING_API_URL right?" in reason


def test_fetch_instances_faults_are_retried(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec(f"i{n}") for n in range(6)])
    sim.add_fault("error", endpoint="one")
    sim.add_fault("drop", endpoint="one")
    sim.add_fault("rate_limit", endpoint="one", retry_after=0)
    # One id may meet all three faults in a row: allow a fourth attempt.
    snap = make_client(concurrency=3, max_attempts=4).fetch_instances([f"i{n}" for n in range(6)])
    assert len(snap.records) == 6
    assert sim.request_count("one") == 9


def test_fetch_instances_persistent_failure_leaves_those_instances_alone(sim: BillingSimulator, make_client) -> None:
    sim.set_records([rec(f"i{n}") for n in range(8)])
    sim.add_fault("error", endpoint="one", after=3, count=None)
    snap = make_client(concurrency=1, max_attempts=2).fetch_instances([f"i{n}" for n in range(8)])
    assert snap.records["instance_id"].tolist() == ["i0", "i1", "i2"]
    failed = unresolved(snap)
    assert sorted(failed) == [f"i{n}" for n in range(3, 8)]
    assert {s for s, _ in failed.values()} == {"unavailable"}
    assert "GET /v1/subscriptions/{id} (instance 'i3') failed after 2 attempts" in failed["i3"][1]


def test_billing_down_for_every_look_up_raises(sim: BillingSimulator, make_client) -> None:
    sim.add_fault("error", endpoint="one", count=None)
    with pytest.raises(BillingUnavailableError, match=r"GET /v1/subscriptions/\{id\} \(instance 'a'\)"):
        make_client(max_attempts=2).fetch_instances(["a"])  # one look-up, no answer at all
    sim.reset_counts()
    with pytest.raises(BillingUnavailableError, match="look-ups in a row failed"):
        make_client(concurrency=2, max_attempts=1).fetch_instances([f"i{n}" for n in range(50)])
    assert sim.request_count("one") < 20  # the breaker stops the rest


def test_fetch_instances_concurrency_is_bounded(make_client) -> None:
    lock = threading.Lock()
    in_flight = 0
    peak = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.03)
        with lock:
            in_flight -= 1
        instance_id = request.url.path.rsplit("/", 1)[-1]
        return httpx.Response(200, json=rec(instance_id))

    client = make_client(base_url="https://billing.example", transport=httpx.MockTransport(handler), concurrency=4)
    snap = client.fetch_instances([f"i{n}" for n in range(20)])
    assert len(snap.records) == 20
    assert 2 <= peak <= 4


@pytest.mark.parametrize("bad", ["", "x" * 257, "new\nline", 42, None])
def test_fetch_instances_rejects_unusable_requested_ids(make_client, sim: BillingSimulator, bad) -> None:
    with pytest.raises(ValueError):
        make_client().fetch_instances(["ok", bad])
    assert sim.request_count() == 0


def test_fetch_instances_rejects_a_bare_string(make_client) -> None:
    with pytest.raises(TypeError):
        make_client().fetch_instances("abc")


_id_text = (
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp")), min_size=1, max_size=40)
    .map(lambda s: unicodedata.normalize("NFC", s).strip())
    .filter(lambda s: instance_id_problem(s) is None)
)


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[BillingSimulator]:
    with BillingSimulator(token=TOKEN) as s:
        yield s


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance_id=_id_text)
def test_any_id_round_trips(shared_sim: BillingSimulator, instance_id: str) -> None:
    shared_sim.upsert(rec(instance_id, plan_id="round-trip"))
    with BillingClient(shared_sim.base_url, TOKEN, max_attempts=1) as client:
        snap = client.fetch_instances([instance_id])
    assert snap.records["instance_id"].tolist() == [instance_id]
    shared_sim.delete(instance_id)


# -- secrets & lifecycle ---------------------------------------------------------------------


def test_token_never_leaks(sim: BillingSimulator, make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    reasons: list[tuple[str, str]] = []
    client = make_client(max_attempts=2)
    scenarios: list[tuple[str, dict]] = [
        ("error", {"count": None}),
        ("rate_limit", {"count": None, "retry_after": 0}),
        ("drop", {"count": None}),
        ("malformed", {"count": None}),
        ("bad_shape", {"count": None}),
    ]
    for kind, kwargs in scenarios:
        sim.clear_faults()
        sim.add_fault(kind, **kwargs)
        with pytest.raises(BillingError) as info:
            client.fetch_all()
        errors.append(info.value)
        try:
            reasons.extend(unresolved(client.fetch_instances(["a"])).values())
        except BillingError as exc:
            errors.append(exc)
    sim.clear_faults()
    reasons.extend(unresolved(make_client(base_url=sim.base_url + "/nope").fetch_instances(["a"])).values())
    assert len(errors) + len(reasons) == 11
    for exc in errors:
        assert_one_line_no_token(exc)
        assert TOKEN not in str(exc.__cause__ or "")
    for _, reason in reasons:
        assert TOKEN not in reason and "\n" not in reason
    assert TOKEN not in repr(client) and "BillingClient(" in repr(client)
    assert "retrying" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token", ["", "   ", "two\nlines", "ünicode"])
def test_unusable_token_rejected_without_echo(token: str) -> None:
    with pytest.raises(ValueError) as info:
        BillingClient("http://127.0.0.1:1", token)
    assert token.strip() == "" or token not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "/relative"])
def test_bad_base_url_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        BillingClient(url, TOKEN)


def test_context_manager_closes(sim: BillingSimulator) -> None:
    with BillingClient(sim.base_url, TOKEN) as client:
        client.fetch_all()
    with pytest.raises(BillingError, match="closed"):
        client.fetch_all()
