"""The report ops read in the Dagster UI: a :class:`~creditsync_pipeline.sync.SyncReport` as metadata.

Pure functions (report in, metadata dict out), one per asset of the full sync, so the
asset module only runs the sync and yields. What each asset shows, in reading order:

1. ``summary`` (markdown) and the per-kind ``<kind>_count`` integers (Dagster plots an
   integer over runs on the asset's page: that is the "mismatches per kind" chart);
2. a narrow table (5 short columns: instance, kind, plan old → new, credits old → new,
   a shortened reason), at most :data:`TABLE_ROWS` rows with the count of the rest;
3. on ``credit_corrections`` the corrected instances themselves (id, old → new);
4. the full list: a link to ``creditsync serve``'s ``/reports/`` route when
   ``CREDITSYNC_PUBLIC_URL`` is set, else the file's path and how to enable the link.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from .. import reports
from ..rules import KINDS
from ..sync import SyncReport

#: rows shown inline in the UI; the full list is in the CSV report
TABLE_ROWS = 50
#: a reason longer than this is cut (the whole text is in the CSV)
REASON_CHARS = 30
#: what the table's "why" drops of a reason: the "billing: " lead-in and the record's
#: timestamp (both in the CSV), so the evidence itself fits the column at 1600 px
_REASON_NOISE = re.compile(r"billing: |,? ?updated \d{4}-\d\d-\d\dT[^,)]*")

_NARROW = TableSchema(
    columns=[
        TableColumn("instance_id", "string"),
        TableColumn("kind", "string"),
        TableColumn("change", "string", description="plan, credits: current → expected"),
        TableColumn("why", "string", description="the reason, shortened (whole text in the CSV)"),
    ]
)
_CORRECTED = TableSchema(
    columns=[
        TableColumn("instance_id", "string"),
        TableColumn("plan", "string", description="old → new"),
        TableColumn("credits", "string", description="old → new"),
    ]
)


def _text(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _arrow(old: Any, new: Any) -> str:
    old_text, new_text = _text(old), _text(new)
    return old_text if old_text == new_text else f"{old_text} → {new_text}"


def short(text: Any, limit: int = REASON_CHARS) -> str:
    """``text`` on one line without the lead-in and timestamps, cut to ``limit`` characters."""
    line = " ".join(_REASON_NOISE.sub("", _text(text)).split()).replace("()", "").strip()
    line = line.replace("no entitling subscription", "not entitled")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def mismatch_table(mismatches: pd.DataFrame, limit: int = TABLE_ROWS) -> MetadataValue:
    """The first ``limit`` mismatches as a narrow UI table (readable at 1600 px)."""
    records = [
        TableRecord(
            {
                "instance_id": _text(r.instance_id),
                "kind": _text(r.kind),
                "change": f"{_arrow(r.current_plan_id, r.expected_plan_id)}, "
                f"{_arrow(r.current_credits_total, r.expected_credits_total)}",
                "why": short(getattr(r, "reason", "")),
            }
        )
        for r in mismatches.head(limit).itertuples(index=False)
    ]
    return MetadataValue.table(records=records, schema=_NARROW)


def corrections_table(corrections: pd.DataFrame, limit: int = TABLE_ROWS) -> MetadataValue:
    """The first ``limit`` corrections (``CORRECTION_COLUMNS``): id, plan and credits old → new."""
    records = [
        TableRecord(
            {
                "instance_id": _text(r.instance_id),
                "plan": _arrow(r.old_plan_id, r.new_plan_id),
                "credits": _arrow(r.old_credits_total, r.new_credits_total),
            }
        )
        for r in corrections.head(limit).itertuples(index=False)
    ]
    return MetadataValue.table(records=records, schema=_CORRECTED)


def _more(total: int, limit: int = TABLE_ROWS) -> str:
    return f"showing {min(total, limit)} of {total}" + (f"; {total - limit} more in the full list" if total > limit else "")


def full_list(path: Path | None, link: str | None) -> tuple[dict[str, MetadataValue], str]:
    """The full list's metadata entries and one markdown line saying where it is."""
    if path is None:
        return {}, "The full list was not written."
    if link:
        return {"full_list": MetadataValue.url(link)}, f"Full list: [{path.name}]({link})."
    return (
        {"full_list_csv": MetadataValue.path(str(path))},
        f"Full list: `{path}` on the Dagster host. Set `CREDITSYNC_PUBLIC_URL` (the URL of "
        "`creditsync serve`) and `CREDITSYNC_APP_SECRET` to get a link here.",
    )


def report_link(public_url: str, secret: str, path: Path) -> str | None:
    """The ``serve`` URL of a report file, keyed with the app secret (None without both)."""
    if not public_url or not secret:
        return None
    return f"{public_url.rstrip('/')}/reports/{path.name}?key={reports.link_key(secret, path.name)}"


def billing_metadata(report: SyncReport) -> dict[str, MetadataValue]:
    """``billing_subscriptions``: what billing said."""
    return {
        "records": MetadataValue.int(report.billing_records - report.invalid_records),
        "invalid_records": MetadataValue.int(report.invalid_records),
        "pages": MetadataValue.int(report.billing_pages),
        "lookups": MetadataValue.int(report.lookups),
        "provider": MetadataValue.text(report.provider),
        "fetch_seconds": MetadataValue.float(round(report.timings.get("fetch", 0.0), 3)),
        "status_counts": MetadataValue.json(report.billing_status_counts),
        "left_alone": MetadataValue.json(report.unresolved_counts()),
    }


def instances_metadata(report: SyncReport) -> dict[str, MetadataValue]:
    """``instance_credits``: the app side."""
    rows = "\n".join(
        f"| {p['plan_id']} | {p['credits']} | {'yes' if p['is_free'] else ''} | {p['instances']} |" for p in report.plans
    )
    return {
        "instances": MetadataValue.int(report.total_instances),
        "read_seconds_not_hidden_by_fetch": MetadataValue.float(round(report.timings.get("read", 0.0), 3)),
        "plans": MetadataValue.md("| plan | credits | free | instances |\n|---|---|---|---|\n" + rows),
    }


def mismatches_metadata(report: SyncReport, path: Path | None, link: str | None) -> dict[str, MetadataValue]:
    """``credit_mismatches``: summary and per-kind counts first, then the narrow table."""
    where, line = full_list(path, link)
    count = report.mismatch_count
    verdict = f"**Refused:** {report.refused}" if report.refused else "Guard rails: ok."
    summary = (
        f"**{count} mismatch(es)** among {report.total_instances} instance(s), "
        f"{report.planned} correction(s) planned. {verdict}\n\n"
        "| kind | count |\n|---|---|\n"
        + "\n".join(f"| `{k}` | {report.counts.get(k, 0)} |" for k in KINDS)
        + f"\n\nTable: {_more(count)}. {line}"
    )
    metadata: dict[str, MetadataValue] = {"summary": MetadataValue.md(summary)}
    metadata.update({f"{k}_count": MetadataValue.int(report.counts.get(k, 0)) for k in KINDS})
    metadata.update(
        {
            "mismatch_count": MetadataValue.int(count),
            "total_instances": MetadataValue.int(report.total_instances),
            "planned_corrections": MetadataValue.int(report.planned),
            "withheld_newer_rows": MetadataValue.int(report.skipped_stale),
            "guard_rail": MetadataValue.text(report.refused or "ok"),
            "mismatches": mismatch_table(report.mismatches),
        }
    )
    metadata.update(where)
    return metadata


def corrections_metadata(report: SyncReport, path: Path | None, link: str | None) -> dict[str, MetadataValue]:
    """``credit_corrections``: what was written, and the corrected instances themselves."""
    where, line = full_list(path, link)
    if report.dry_run:
        head = f"**Dry run:** nothing written; {report.planned} correction(s) would be applied."
    elif report.refused:
        head = f"**Refused:** {report.refused}; nothing written."
    else:
        head = f"**{report.applied_count} instance(s) corrected** of {report.planned} planned."
    skipped = report.skipped_conflict + report.skipped_stale
    summary = (
        f"{head} Skipped (changed during the run): {skipped}. Still wrong after the write: "
        f"{len(report.remaining) if report.verified else 'unknown (the check failed)'}.\n\n"
        f"Corrected instances: {_more(report.applied_count)}. {line}"
        + "".join(f"\n\n**Warning:** {w}" for w in report.warnings)
    )
    metadata = {
        "summary": MetadataValue.md(summary),
        "applied": MetadataValue.int(report.applied_count),
        "planned": MetadataValue.int(report.planned),
        "skipped_conflict": MetadataValue.int(report.skipped_conflict),
        "skipped_stale": MetadataValue.int(report.skipped_stale),
        "remaining": MetadataValue.int(len(report.remaining)),
        "dry_run": MetadataValue.bool(report.dry_run),
        "refused": MetadataValue.text(report.refused or "no"),
        "trigger": MetadataValue.text(report.trigger),
        "corrected_instances": corrections_table(report.applied),
        "timings": MetadataValue.json({k: round(v, 3) for k, v in report.timings.items()}),
    }
    metadata.update(where)
    return metadata


def remaining_check_metadata(report: SyncReport) -> dict[str, MetadataValue]:
    """``no_mismatches_after_fix``: what is still wrong after the write."""
    return {
        "remaining": MetadataValue.int(len(report.remaining)),
        "applied": MetadataValue.int(report.applied_count),
        "remaining_instances": corrections_table(report.remaining),
    }


def unknown_plan_rows(report: SyncReport) -> pd.DataFrame:
    """The ``unknown_plan`` mismatches of a report."""
    return report.mismatches[report.mismatches["kind"] == "unknown_plan"]


def unknown_plans_check_metadata(report: SyncReport) -> tuple[dict[str, MetadataValue], list[str]]:
    """``no_unknown_plans``: the instances entitled to a plan missing from ``plans``."""
    unknown = unknown_plan_rows(report)
    plans = sorted(set(unknown["expected_plan_id"].dropna().astype(str)))
    return (
        {
            "unknown_plan_instances": MetadataValue.int(len(unknown)),
            "unknown_plans": MetadataValue.json(plans),
            "instances": mismatch_table(unknown),
        },
        plans,
    )


__all__ = [
    "REASON_CHARS", "TABLE_ROWS", "billing_metadata", "corrections_metadata", "corrections_table",
    "full_list", "instances_metadata", "mismatch_table", "mismatches_metadata", "remaining_check_metadata",
    "report_link", "short", "unknown_plans_check_metadata",
]
