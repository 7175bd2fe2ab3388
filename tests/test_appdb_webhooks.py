"""``billing_webhook_events`` rows: landing, leases, claims, marks."""

from __future__ import annotations

import sqlalchemy as sa


def test_land_webhook_event_is_idempotent_on_event_id(engine):
    from creditsync_pipeline.appdb import billing_webhook_events, land_webhook_event

    assert land_webhook_event(engine, event_id="evt_1", event_type="subscription.updated", instance_id="a/b", payload='{"x": 1}')
    assert not land_webhook_event(engine, event_id="evt_1", event_type="other", instance_id="zzz", payload=None)
    assert land_webhook_event(engine, event_id="evt_2", event_type="subscription.updated", instance_id=None, payload=None)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(billing_webhook_events.c.event_id, billing_webhook_events.c.instance_id,
                      billing_webhook_events.c.event_type, billing_webhook_events.c.processed_at)
            .order_by(billing_webhook_events.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("evt_1", "a/b", "subscription.updated", None),
        ("evt_2", None, "subscription.updated", None),
    ]
