"""``credit_sync_failure_alert``: every failed creditsync run logged and posted as one line."""

import os

from dagster import DefaultSensorStatus, RunFailureSensorContext, run_failure_sensor

from ... import appdb
from ..assets import TRIGGER_TAG
from ..resources import AlertWebhookResource
from .batches import MIN_INTERVAL_SECONDS, logger


def failure_reason(context: RunFailureSensorContext) -> str:
    """One line: why the run failed (the step errors, else Dagster's run failure message)."""
    reasons: list[str] = []
    try:
        step_failures = context.get_step_failure_events()
    except Exception:  # noqa: BLE001 - the event log may be unavailable; fall back below
        step_failures = []
    for event in step_failures:
        data = event.step_failure_data
        text = ""
        if data is not None and data.user_failure_data is not None and data.user_failure_data.description:
            text = data.user_failure_data.description
        elif data is not None and data.error is not None:
            text = data.error.message
            head, sep, rest = text.partition(": ")
            if sep and "." in head and " " not in head:  # "package.module.ErrorClass: message"
                text = f"{head.rsplit('.', 1)[-1]}: {rest}"
        text = " ".join(text.split())
        if text.startswith("[CreditSync] "):
            text = text[len("[CreditSync] ") :]
        if text:
            reasons.append(f"{event.step_key}: {text}" if event.step_key else text)
    if not reasons:
        reasons.append(" ".join((context.failure_event.message or "run failed").split()))
    return "; ".join(reasons)[:1000]


def _redact(text: str) -> str:
    """Mask the secrets this process knows, defensively (errors never carry them by design)."""
    for name in ("BILLING_API_TOKEN", "CREDITSYNC_APP_SECRET", "CREDITSYNC_WEBHOOK_SECRET"):
        secret = os.environ.get(name, "").strip()
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return appdb.redact_url(text) if "://" in text else text


@run_failure_sensor(
    name="credit_sync_failure_alert",
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=MIN_INTERVAL_SECONDS,
    description="Logs '[CreditSync] Error running credit sync task: ...' for every failed creditsync run and posts it "
    "to the alert webhook in CREDITSYNC_ALERT_WEBHOOK_URL when that is set.",
)
def credit_sync_failure_alert(context: RunFailureSensorContext, alert_webhook: AlertWebhookResource) -> None:
    run = context.dagster_run
    trigger = run.tags.get(TRIGGER_TAG, "manual")
    message = _redact(
        f"[CreditSync] Error running credit sync task: {run.job_name} run {run.run_id[:8]} "
        f"(trigger {trigger}) failed: {failure_reason(context)}"
    )
    context.log.error(message)
    logger.error(message)
    if not alert_webhook.configured():
        return
    problem = alert_webhook.post(
        {"text": message, "job_name": run.job_name, "run_id": run.run_id, "trigger": trigger}
    )
    if problem:
        context.log.warning(f"[CreditSync] Could not post the failure alert: {problem}")

