"""The sync service: a full or targeted reconciliation, and its report.

Every entry point (Dagster assets, sensors' jobs, the CLI, the HTTP app)
calls these functions; none of them re-implements a step. A run is five
stages, each also callable on its own (the Dagster assets call them one per
asset):

1. :func:`fetch_billing` / :func:`fetch_billing_for` — billing records;
2. :func:`read_state` — plans and instance rows (a full run reads them while
   the billing pages arrive; either order is safe: a row changed after the read
   fails the compare-and-set, a row changed before it is newer than the billing
   data and is skipped as stale);
3. :func:`decide` — the pure rules and guard rails;
4. :func:`apply` — bulk compare-and-set writes with audit rows, one transaction;
5. :func:`verify` — re-read the touched rows: what is still wrong.

One module per concern: :mod:`.model` (options, the app's side, the report, the
exceptions), :mod:`.stages` (the five stages), :mod:`.runs` (whole full and targeted
runs), :mod:`.report` (building the report, the operator log lines), :mod:`.revert`
(undoing a run). Callers import from ``creditsync_pipeline.sync``.
"""

from .model import (
    TRIGGERS,
    UNRESOLVED_LISTED,
    AppState,
    DecisionTooOld,
    Log,
    SyncOptions,
    SyncRefused,
    SyncReport,
    new_run_id,
    utcnow,
)
from .report import build_report, log_outcome, one_line, reporting_errors
from .revert import run_revert
from .runs import run_full_sync, run_targeted_sync
from .stages import (
    AppDbCustomerLinks,
    apply,
    decide,
    fetch_billing,
    fetch_billing_for,
    left_alone,
    open_billing,
    read_state,
    verify,
)

__all__ = [
    "TRIGGERS",
    "UNRESOLVED_LISTED",
    "AppDbCustomerLinks",
    "AppState",
    "DecisionTooOld",
    "Log",
    "SyncOptions",
    "SyncRefused",
    "SyncReport",
    "apply",
    "build_report",
    "decide",
    "fetch_billing",
    "fetch_billing_for",
    "left_alone",
    "log_outcome",
    "new_run_id",
    "one_line",
    "open_billing",
    "read_state",
    "reporting_errors",
    "run_full_sync",
    "run_revert",
    "run_targeted_sync",
    "utcnow",
    "verify",
]
