"""Ids compare exactly on every server: case, trailing spaces, accents, normal forms.

SPEC: "Ids are compared exactly". SQLite and PostgreSQL compare bytes; MySQL/MariaDB
compare through a collation, which must be binary *and* NO PAD (``utf8mb4_bin`` alone
would make 'abc' equal 'abc '). The MySQL test database's own default collation is
case-insensitive (``tests/conftest.py``), so only the DDL's collation can make these pass.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    apply_corrections,
    customer_links_for,
    read_audit,
    read_instances,
    remember_customer_links,
)

from .appdb_support import NOW, by_id, corrections_frame, instance_row, seed

#: Equal under a case-, pad- or accent-insensitive comparison; five different ids here.
LOOKALIKES = ["abc", "ABC", "abc ", "abç", "abc\u0327"]  # the last: 'ç' decomposed (NFD)


def test_lookalike_ids_are_distinct_rows(engine: Engine) -> None:
    seed(engine, [instance_row(iid, credits_total=n) for n, iid in enumerate(LOOKALIKES)])
    assert appdb.count_instances(engine) == len(LOOKALIKES)
    every = read_instances(engine)
    assert sorted(every["instance_id"]) == sorted(LOOKALIKES)
    for n, iid in enumerate(LOOKALIKES):  # each id reads back its own row only
        [row] = read_instances(engine, [iid]).to_dict("records")
        assert (row["instance_id"], row["credits_total"]) == (iid, n)
    with engine.connect() as conn:
        hits = conn.execute(sa.select(appdb.instances.c.instance_id).where(appdb.instances.c.instance_id == "abc")).scalars()
        assert list(hits) == ["abc"]


def test_a_correction_touches_only_its_exact_id(engine: Engine) -> None:
    seed(engine, [instance_row(iid) for iid in LOOKALIKES])
    result = apply_corrections(engine, corrections_frame([{"instance_id": "abc"}, {"instance_id": "abç"}]),
                               run_id="exact", trigger="manual", now=NOW)
    assert sorted(result.applied["instance_id"]) == ["abc", "abç"]
    rows = by_id(read_instances(engine))
    changed = sorted(iid for iid, row in rows.items() if row["plan_id"] == "pro")
    assert changed == ["abc", "abç"]
    assert sorted(read_audit(engine, "exact")["instance_id"]) == ["abc", "abç"]


def test_customer_links_keep_lookalike_ids_apart(engine: Engine) -> None:
    links = {iid: f"cus_{n}" for n, iid in enumerate(LOOKALIKES)}
    assert remember_customer_links(engine, "stripe", links) == len(LOOKALIKES)
    assert customer_links_for(engine, "stripe", LOOKALIKES) == links
    assert customer_links_for(engine, "stripe", ["abc"]) == {"abc": "cus_0"}
    # Plan ids compare exactly too: "PRO" is not the plan "pro".
    appdb.upsert_plans(engine, [{"plan_id": "pro", "credits": 5000, "is_free": False},
                                {"plan_id": "PRO", "credits": 1, "is_free": False}])
    plans = appdb.load_plans(engine).set_index("plan_id")["credits"].to_dict()
    assert plans == {"PRO": 1, "pro": 5000}
