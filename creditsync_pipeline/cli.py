"""The ``creditsync`` command line: check, fix, init-db, serve, demo (and, in
:mod:`.cli_tools`, revert, doctor, token sign, webhook sign).

Exit codes: ``check`` 0 = no mismatch, 1 = mismatches; ``fix`` 0 = done,
3 = refused by a guard rail, 4 = done but billing could not answer for some
instances (left alone, listed); ``doctor`` 0 = every check ok, 1 = a FAIL; ``revert``
0 = done (also when already reverted); every command 2 = error, with one line on
stderr and no traceback (set ``CREDITSYNC_DEBUG=1`` for one). ``-v`` goes before or
after the command. ``CREDITSYNC_LOG_FILE`` sends the log lines to that file too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

from . import appdb, cli_tools, logs, settings, sync
from .billing import FAILED_STATUSES, BillingError
from .ids import log_safe
from .rules import MISMATCH_COLUMNS, RulesError

EXIT_OK = 0
EXIT_MISMATCHES = 1
EXIT_ERROR = 2
EXIT_REFUSED = 3
#: ``fix`` did its work, but billing could not answer for some instances (left alone, listed)
EXIT_LEFT_ALONE = 4
#: left-alone instances listed one per line in the text output
UNRESOLVED_SHOWN = 20

EXPECTED_ERRORS = (BillingError, appdb.AppDatabaseError, RulesError, settings.SettingsError, logs.LogFileError)
#: commands that run until stopped: their errors while running stay on the terminal
LONG_RUNNING = ("serve", "demo")


def _configure_logging(verbose: bool, command: str) -> None:
    logs.configure_terminal(verbose=verbose, one_shot=command not in LONG_RUNNING)
    logs.attach_log_file()


class UnknownInstancesError(Exception):
    """``--instance`` named ids that have no row in ``instances`` (nothing was run)."""


def _require_known(engine: Any, instance_ids: list[str]) -> None:
    """Refuse, before billing is asked anything, ids the app database does not have."""
    have = set(appdb.read_instances(engine, instance_ids, ordered=False)["instance_id"])
    unknown = [i for i in dict.fromkeys(instance_ids) if i not in have]
    if unknown:
        shown = ", ".join(repr(log_safe(i, 80)) for i in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise UnknownInstancesError(f"unknown instance id(s): {shown}{more} (no row in instances); nothing was checked")


def _run_sync(cfg: settings.Settings, instance_ids: list[str] | None, options: sync.SyncOptions) -> sync.SyncReport:
    engine = appdb.create_engine_from_url(cfg.require_database_url())
    try:
        if instance_ids:
            _require_known(engine, instance_ids)
        # A dry run writes nothing, not even creditsync's own cache of Stripe customer links.
        with sync.open_billing(cfg, engine, remember_links=not options.dry_run) as billing:
            if instance_ids:
                return sync.run_targeted_sync(engine, billing, instance_ids, trigger="manual", options=options)
            return sync.run_full_sync(engine, billing, trigger="manual", options=options)
    finally:
        engine.dispose()


def _jsonable(value: Any) -> Any:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if hasattr(value, "item"):  # numpy / pandas scalars
        return value.item()
    return value


def mismatches_json(report: sync.SyncReport) -> dict[str, Any]:
    """The ``check --json`` document (SPEC shape, plus counts)."""
    rows = [
        {col: _jsonable(getattr(row, col)) for col in MISMATCH_COLUMNS}
        for row in report.mismatches.itertuples(index=False)
    ]
    doc = {"mismatches": rows, **report.summary()}
    doc["unresolved_instances"] = [  # every one of them here (the summary keeps the first ones)
        {"instance_id": str(r.instance_id), "status": str(r.status), "reason": str(r.reason)}
        for r in report.unresolved.itertuples(index=False)
    ]
    return doc


def _print_unresolved(report: sync.SyncReport, out: Any) -> None:
    """The instances billing could not answer for: left alone, never written."""
    if report.unresolved.empty:
        return
    counts = ", ".join(f"{k}={v}" for k, v in sorted(report.unresolved_counts().items()))
    print(f"{len(report.unresolved)} instance(s) left alone: billing could not answer for them ({counts}):", file=out)
    for row in report.unresolved.head(UNRESOLVED_SHOWN).itertuples(index=False):
        print(f"  {log_safe(row.instance_id, 80)}  {row.status}  {log_safe(row.reason, 160)}", file=out)
    if len(report.unresolved) > UNRESOLVED_SHOWN:
        print(f"  ... and {len(report.unresolved) - UNRESOLVED_SHOWN} more (all of them in --json)", file=out)


def _failed_lookups(report: sync.SyncReport) -> int:
    return int(report.unresolved["status"].isin(FAILED_STATUSES).sum())


def checked_instances(report: sync.SyncReport, instance_ids: list[str] | None) -> int:
    """How many instances the run looked at: all of them, or the ones named."""
    if report.scope == "full" or instance_ids is None:
        return report.total_instances
    return len(set(instance_ids)) - len(report.unknown_instance_ids)


def _print_table(report: sync.SyncReport, out: Any, checked: int) -> None:
    _print_unresolved(report, out)
    if report.mismatches.empty:
        print(f"No mismatches among {checked} instance(s).", file=out)
        return
    print(f"{report.mismatch_count} mismatch(es) among {checked} instance(s):", file=out)
    for kind, n in report.counts.items():
        if n:
            print(f"  {kind}: {n}", file=out)
    print(file=out)
    view = report.mismatches[MISMATCH_COLUMNS[:-1]].astype("object").where(report.mismatches[MISMATCH_COLUMNS[:-1]].notna(), "-")
    print(view.to_string(index=False), file=out)


def cmd_check(args: argparse.Namespace, cfg: settings.Settings) -> int:
    report = _run_sync(cfg, args.instance, sync.SyncOptions.from_settings(cfg, dry_run=True))
    if args.json:
        doc = mismatches_json(report)
        doc["checked_instances"] = checked_instances(report, args.instance)
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        _print_table(report, sys.stdout, checked_instances(report, args.instance))
    return EXIT_MISMATCHES if report.mismatch_count else EXIT_OK


def cmd_fix(args: argparse.Namespace, cfg: settings.Settings) -> int:
    options = sync.SyncOptions.from_settings(cfg, dry_run=args.dry_run, force=args.force)
    report = _run_sync(cfg, args.instance, options)
    if args.json:
        print(json.dumps(mismatches_json(report), ensure_ascii=False, indent=2))
    else:
        s = report.summary()
        print(
            f"mismatches={s['mismatch_count']} planned={s['planned']} applied={s['applied']} "
            f"skipped_conflict={s['skipped_conflict']} skipped_stale={s['skipped_stale']} "
            f"remaining={s['remaining']} dry_run={str(report.dry_run).lower()}"
        )
        _print_unresolved(report, sys.stdout)
    for warning in report.warnings:
        print(f"creditsync: warning: committed {report.applied_count} correction(s), but {warning}", file=sys.stderr)
    if report.refused:
        print(f"creditsync: refused: {report.refused}", file=sys.stderr)
        return EXIT_REFUSED
    if _failed_lookups(report):
        print(f"creditsync: {_failed_lookups(report)} instance(s) left alone: billing could not answer for them",
              file=sys.stderr)
        return EXIT_LEFT_ALONE
    return EXIT_OK


def cmd_init_db(args: argparse.Namespace, cfg: settings.Settings) -> int:
    engine = appdb.create_engine_from_url(cfg.require_database_url())
    try:
        applied = appdb.init_db(engine)
    finally:
        engine.dispose()
    print(f"schema applied to {appdb.redact_url(cfg.database_url)} ({', '.join(applied) or 'nothing to apply'})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from .server.app import ServeError, serve

    try:
        serve(cfg, host=args.host, port=args.port)
    except ServeError as exc:
        print(f"creditsync: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, cfg: settings.Settings) -> int:
    from . import demo

    return demo.main(port=args.port, ui=not args.no_ui, provider=args.provider)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="creditsync",
        description="Keep every instance's plan and credits equal to what billing says.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -v after the command too: SUPPRESS keeps a subcommand from resetting a -v given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", parents=[common], help="report mismatches; exit 1 when there are any")
    check.add_argument("--instance", action="append", metavar="ID", help="only this instance (repeatable)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_check)

    fix = sub.add_parser("fix", parents=[common], help="correct mismatches (compare-and-set, audited)")
    fix.add_argument("--dry-run", action="store_true", help="compute and report, write nothing")
    fix.add_argument("--force", action="store_true", help="override the guard rails")
    fix.add_argument("--instance", action="append", metavar="ID", help="only this instance (repeatable)")
    fix.add_argument("--json", action="store_true", help="print the report as JSON")
    fix.set_defaults(func=cmd_fix)

    init = sub.add_parser("init-db", parents=[common], help="apply sql/ to DATABASE_URL (idempotent)")
    init.set_defaults(func=cmd_init_db)

    serve = sub.add_parser("serve", parents=[common], help="run the manual-sync (\"Sync credits\") and webhook HTTP app")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", parents=[common], help="seed a SQLite app DB, start the billing simulator and the Dagster UI")
    demo.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    demo.add_argument("--no-ui", action="store_true", help="seed and run the first sync, then exit")
    demo.add_argument("--provider", choices=("generic", "wix", "stripe"), default="generic",
                      help="the billing provider to simulate (default generic)")
    demo.set_defaults(func=cmd_demo)
    cli_tools.add_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _configure_logging(args.verbose, args.command)
        cfg = settings.from_env()
        return args.func(args, cfg)
    except UnknownInstancesError as exc:
        print(f"creditsync: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except EXPECTED_ERRORS as exc:
        print(f"creditsync: error: {sync.one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an unexpected fault: still one line unless debugging
        if os.environ.get("CREDITSYNC_DEBUG"):
            raise
        print(f"creditsync: error: unexpected {type(exc).__name__}: {sync.one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
