"""The rough edges a newcomer hit (issue 13): each one fixed, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from creditsync_pipeline import cli
from creditsync_pipeline.server.tokens import verify_instance_token
from creditsync_pipeline.server.webhooks import verify_webhook_signature

from .helpers import TOKEN, dump_tables
from .test_cli_e2e import run_cli, sim, world  # noqa: F401 - fixtures

APP_SECRET = "app-SECRET-rough-41d9"
WEBHOOK_SECRET = "whsec-SECRET-rough-77aa"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("command", ["check", "fix"])
def test_unknown_instance_ids_exit_2_naming_them(world, db_url, command, capsys):
    before = dump_tables(db_url)
    code, out, err = run_cli(capsys, command, "--instance", "no-such-id", "--instance", "abc123")
    assert code == 2 and out == ""
    assert _error_lines(err) == ["creditsync: error: unknown instance id(s): 'no-such-id' (no row in instances); "
                                 "nothing was checked"]
    assert dump_tables(db_url) == before


def test_among_n_counts_the_instances_checked(world, capsys):
    code, out, _ = run_cli(capsys, "check", "--instance", "abc123")
    assert code == 1 and "1 mismatch(es) among 1 instance(s):" in out
    code, out, _ = run_cli(capsys, "check", "--instance", "abc123", "--instance", "abc123", "--json")
    assert json.loads(out)["checked_instances"] == 1
    code, out, _ = run_cli(capsys, "check")
    assert f"among {len(world.instances)} instance(s)" in out


@pytest.mark.parametrize("argv", [["check"], ["fix", "--dry-run"], ["init-db"], ["revert", "some-run"]])
def test_no_database_url_is_one_line_and_creates_no_file(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "DATABASE_URL is not set" in err
    assert list(tmp_path.iterdir()) == [], "a command created a file without being asked to"


def test_missing_schema_says_run_init_db(db_url, sim, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", db_url)  # a fresh database without creditsync's tables
    monkeypatch.setenv("BILLING_API_URL", sim.base_url)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    for argv in (["check"], ["revert", "r1"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        (line,) = _error_lines(err)
        assert "run `creditsync init-db`" in line, line


@pytest.mark.parametrize("variable", ["BILLING_API_URL", "WIX_API_BASE", "STRIPE_API_BASE"])
@pytest.mark.parametrize("value", ["not a url", "http://not a url", "https://bill ing.example.com/v1", "ftp://billing.example.com", "http://", "http://host:99999", "http://[::1"])
def test_a_bad_url_setting_is_a_settings_error(variable, value, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv(variable, value)
    code, out, err = run_cli(capsys, "check")
    assert code == 2
    assert err.strip().splitlines() == [f"creditsync: error: {variable} must be an absolute http(s) URL such as "
                                        "https://billing.example.com"]


@pytest.mark.parametrize("argv", [["-v", "check"], ["check", "-v"], ["check", "--json", "--verbose"]])
def test_verbose_before_or_after_the_command(argv):
    assert cli.build_parser().parse_args(argv).verbose is True
    assert cli.build_parser().parse_args(["check"]).verbose is False


def test_an_error_prints_once(world, monkeypatch, capsys):
    monkeypatch.setenv("BILLING_API_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("BILLING_API_MAX_ATTEMPTS", "1")
    for argv in (["check"], ["fix"], ["-v", "fix"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        errors = _error_lines(err)
        assert len(errors) == 1 and errors[0].startswith("creditsync: error: "), err


def _cli(*args: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITSYNC_", "BILLING_", "DATABASE_"))}
    return subprocess.run([sys.executable, "-m", "creditsync_pipeline.cli", *args], input=stdin,
                          env={**base, **env}, capture_output=True, timeout=60)


def test_token_sign_reads_the_secret_from_the_environment(tmp_path):
    done = _cli("token", "sign", "abc123", env={"CREDITSYNC_APP_SECRET": APP_SECRET})
    assert done.returncode == 0, done.stderr
    token = done.stdout.decode().strip()
    assert verify_instance_token(token, APP_SECRET).instance_id == "abc123"
    assert APP_SECRET.encode() not in done.stdout + done.stderr
    other = _cli("token", "sign", "abc123", "--secret-env", "MY_SECRET", env={"MY_SECRET": APP_SECRET})
    assert verify_instance_token(other.stdout.decode().strip(), APP_SECRET).instance_id == "abc123"
    missing = _cli("token", "sign", "abc123", env={})
    assert missing.returncode == 2 and missing.stdout == b""
    assert missing.stderr.decode().strip().splitlines() == [
        "creditsync: error: CREDITSYNC_APP_SECRET is not set (the secret is read from the environment, never an argument)"]


def test_webhook_sign_signs_the_body_on_stdin():
    body = b'{"event_id": "evt-1", "type": "subscription.updated", "instance_id": "abc123"}'
    done = _cli("webhook", "sign", env={"CREDITSYNC_WEBHOOK_SECRET": WEBHOOK_SECRET}, stdin=body)
    assert done.returncode == 0, done.stderr
    header = done.stdout.decode().strip()
    assert header.startswith("t=") and ",v1=" in header
    verify_webhook_signature(header, body, WEBHOOK_SECRET)  # raises when it does not match
    assert WEBHOOK_SECRET.encode() not in done.stdout + done.stderr
    assert _cli("webhook", "sign", env={}, stdin=body).returncode == 2

