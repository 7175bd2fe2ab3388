"""The operator commands of ``creditsync``: revert, doctor, token sign, webhook sign.

Each takes the parsed arguments and the settings and returns the exit code; errors
they expect are raised as the CLI's expected errors (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

import pandas as pd

from . import appdb, doctor, settings, sync
from .ids import log_safe

EXIT_OK = 0
EXIT_FAIL = 1
#: revert's text output lists this many skipped instances (all of them in --json)
SKIPPED_SHOWN = 20


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in frame.itertuples(index=False):
        item: dict[str, Any] = {}
        for col in appdb.REVERT_COLUMNS:
            value = getattr(row, col)
            item[col] = None if pd.isna(value) else (value.item() if hasattr(value, "item") else value)
        out.append(item)
    return out


def revert_json(result: appdb.RevertResult) -> dict[str, Any]:
    """The ``revert --json`` document: counts, and each instance reverted or skipped.

    ``reverted``: ``current_*`` what the instance held, ``target_*`` what it holds now (a
    dry run: would hold). ``skipped``: ``current_*`` what it holds now (null: the row is
    gone), ``target_*`` what the revert would have restored.
    """
    return {
        "run_id": result.run_id,
        "revert_run_id": None if result.dry_run or result.already_reverted else result.revert_run_id,
        "dry_run": result.dry_run,
        "already_reverted": result.already_reverted,
        "reverted_count": int(len(result.reverted)),
        "skipped_count": int(len(result.skipped)),
        "reverted": _rows(result.reverted),
        "skipped": _rows(result.skipped),
    }


def cmd_revert(args: argparse.Namespace, cfg: settings.Settings) -> int:
    engine = appdb.create_engine_from_url(cfg.require_database_url())
    try:
        result = sync.run_revert(engine, args.run_id, dry_run=args.dry_run)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(revert_json(result), ensure_ascii=False, indent=2))
        return EXIT_OK
    shown = log_safe(args.run_id)
    if result.already_reverted:
        print(f"Run {shown} was already reverted: nothing reverted.")
        return EXIT_OK
    verb = "Would revert" if result.dry_run else "Reverted"
    line = f"{verb} {len(result.reverted)} instance(s) of run {shown}"
    if not result.dry_run:
        line += f" (audited as run {result.revert_run_id}, trigger revert)"
    print(line + (f"; skipped {len(result.skipped)} changed since the run." if len(result.skipped) else "."))
    for row in result.skipped.head(SKIPPED_SHOWN).itertuples(index=False):
        now = "row gone" if pd.isna(row.current_plan_id) else f"now {log_safe(row.current_plan_id)}/{row.current_credits_total}"
        print(f"  skipped {log_safe(row.instance_id, 80)}: {now}, "
              f"the revert would restore {log_safe(row.target_plan_id)}/{row.target_credits_total}")
    if len(result.skipped) > SKIPPED_SHOWN:
        print(f"  ... and {len(result.skipped) - SKIPPED_SHOWN} more (all of them in --json)")
    if result.dry_run:
        print("Dry run: nothing written.")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, cfg: settings.Settings) -> int:
    checks = doctor.run_checks(cfg)
    failed = [c for c in checks if not c.ok]
    if args.json:
        doc = {"ok": not failed, "checks": [c.__dict__ for c in checks]}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            status = "ok  " if c.ok else "FAIL"
            tail = f" -> {c.what_to_do}" if not c.ok and c.what_to_do else ""
            print(f"{status} {c.name.ljust(width)}  {c.detail}{tail}")
        print(f"{len(checks) - len(failed)} ok, {len(failed)} FAIL")
    return EXIT_FAIL if failed else EXIT_OK


def _secret(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise settings.SettingsError(f"{name} is not set (the secret is read from the environment, never an argument)")
    return value


def cmd_token_sign(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from .server.tokens import TokenError, _parse_sign_date, sign_instance_token

    when: datetime | None = None
    if args.sign_date:
        try:
            when = _parse_sign_date(args.sign_date)
        except TokenError as exc:
            raise settings.SettingsError(f"--sign-date: {exc.message}") from None
    try:
        print(sign_instance_token(_secret(args.secret_env), args.instance_id, when))
    except ValueError as exc:
        raise settings.SettingsError(sync.one_line(exc)) from None
    return EXIT_OK


def cmd_webhook_sign(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from .server.webhooks import sign_webhook

    body = sys.stdin.buffer.read()
    print(sign_webhook(_secret(args.secret_env), body, args.timestamp))
    return EXIT_OK


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the operator commands on the CLI's subparsers."""
    revert = sub.add_parser("revert", parents=[common], help="undo one run's corrections from its audit rows")
    revert.add_argument("run_id", metavar="RUN_ID", help="the run_id of the credit_sync_audit rows to undo")
    revert.add_argument("--dry-run", action="store_true", help="say what would be reverted, write nothing")
    revert.add_argument("--json", action="store_true", help="print the outcome as JSON")
    revert.set_defaults(func=cmd_revert)

    doc = sub.add_parser("doctor", parents=[common], help="check database, billing and Dagster; one line per check")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.set_defaults(func=cmd_doctor)

    token = sub.add_parser("token", parents=[common], help="instance tokens of the manual-sync endpoint")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    sign = token_sub.add_parser("sign", parents=[common], help="print a signed instance token for INSTANCE")
    sign.add_argument("instance_id", metavar="INSTANCE")
    sign.add_argument("--secret-env", default="CREDITSYNC_APP_SECRET", metavar="NAME",
                      help="environment variable holding the signing secret (default CREDITSYNC_APP_SECRET)")
    sign.add_argument("--sign-date", help="ISO-8601 signDate (default: now)")
    sign.set_defaults(func=cmd_token_sign)

    hook = sub.add_parser("webhook", parents=[common], help="webhook signatures of the generic receiver")
    hook_sub = hook.add_subparsers(dest="webhook_command", required=True, metavar="ACTION")
    wsign = hook_sub.add_parser("sign", parents=[common],
                                help="print the X-Creditsync-Signature value for the body read from stdin")
    wsign.add_argument("--secret-env", default="CREDITSYNC_WEBHOOK_SECRET", metavar="NAME",
                       help="environment variable holding the webhook secret (default CREDITSYNC_WEBHOOK_SECRET)")
    wsign.add_argument("--timestamp", type=int, help="unix seconds (default: now)")
    wsign.set_defaults(func=cmd_webhook_sign)
