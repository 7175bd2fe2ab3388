"""Settings read from the environment, in one place.

Every other module takes explicit arguments; only the entry points (CLI, Dagster
resources, HTTP app) read the environment, through :func:`from_env`. ``BILLING_PROVIDER``
and each provider's settings are read here and nowhere else; :mod:`.sync` turns them into a
provider (``sync.open_billing``) for every entry point.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BILLING_API_URL = "http://127.0.0.1:8765"
DEFAULT_MAX_CHANGE_RATIO = 0.10
DEFAULT_MAX_PAID_DOWNGRADE_RATIO = 0.10
DEFAULT_REPORT_RETENTION_DAYS = 30
DEFAULT_SYNC_RATE_LIMIT = 3
DEFAULT_RECEIVER_WORKERS = 2  # manual syncs per instance per minute (``creditsync serve``)
DEFAULT_WIX_API_BASE = "https://www.wixapis.com"
DEFAULT_WIX_CONCURRENCY = 16
DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
DEFAULT_STRIPE_METADATA_KEY = "instance_id"
#: ``CREDITSYNC_FRAME_ANCESTORS``: who may frame the Sync credits page (CSP ``frame-ancestors``)
DEFAULT_FRAME_ANCESTORS = "'self'"

#: the values of ``BILLING_PROVIDER``
PROVIDERS = ("generic", "wix", "stripe")


class SettingsError(Exception):
    """A required setting is missing or unusable (one-line message)."""


class Secret(str):
    """A string whose repr never shows the value (tokens, signing secrets)."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "Secret('***')"


@dataclass(frozen=True)
class WixSettings:
    """``BILLING_PROVIDER=wix``: the app's OAuth credentials and the webhook public key."""

    app_id: str = ""
    app_secret: Secret = field(default=Secret(""), repr=False)
    api_base: str = DEFAULT_WIX_API_BASE
    #: PEM text of the app's webhook public key (``WIX_WEBHOOK_PUBLIC_KEY``: the text or a file path)
    webhook_public_key: str = field(default="", repr=False)
    concurrency: int = DEFAULT_WIX_CONCURRENCY

    def require_credentials(self) -> tuple[str, str]:
        if not self.app_id.strip():
            raise SettingsError("WIX_APP_ID is not set (BILLING_PROVIDER=wix)")
        if not self.app_secret:
            raise SettingsError("WIX_APP_SECRET is not set (BILLING_PROVIDER=wix)")
        return self.app_id.strip(), str(self.app_secret)


@dataclass(frozen=True)
class StripeSettings:
    """``BILLING_PROVIDER=stripe``: the API key, where the instance id lives, the webhook secret."""

    api_key: Secret = field(default=Secret(""), repr=False)
    api_base: str = DEFAULT_STRIPE_API_BASE
    instance_metadata_key: str = DEFAULT_STRIPE_METADATA_KEY
    webhook_secret: Secret = field(default=Secret(""), repr=False)

    def require_api_key(self) -> str:
        if not self.api_key:
            raise SettingsError("STRIPE_API_KEY is not set (BILLING_PROVIDER=stripe)")
        return str(self.api_key)


@dataclass(frozen=True)
class Settings:
    """What creditsync needs to run; built by :func:`from_env`."""

    #: ``DATABASE_URL``; required outside the demo (no default: a command never creates an
    #: empty database file where none was asked for) -- see :meth:`require_database_url`
    database_url: str = ""
    #: ``BILLING_PROVIDER``: generic (the SPEC Billing API), wix or stripe
    billing_provider: str = "generic"
    billing_api_url: str = DEFAULT_BILLING_API_URL
    billing_api_token: Secret = field(default=Secret(""), repr=False)
    #: ``CREDITSYNC_PLAN_MAP``: provider plan identifier -> plans.plan_id
    plan_map: Mapping[str, str] = field(default_factory=dict)
    wix: WixSettings = field(default_factory=WixSettings)
    stripe: StripeSettings = field(default_factory=StripeSettings)
    app_secret: Secret = field(default=Secret(""), repr=False)
    webhook_secret: Secret = field(default=Secret(""), repr=False)
    sync_rate_limit: int = DEFAULT_SYNC_RATE_LIMIT
    #: ``CREDITSYNC_RECEIVER_WORKERS``: threads of ``serve`` that sync landed webhook rows at once (0: off)
    receiver_workers: int = DEFAULT_RECEIVER_WORKERS
    max_change_ratio: float = DEFAULT_MAX_CHANGE_RATIO
    max_paid_downgrade_ratio: float = DEFAULT_MAX_PAID_DOWNGRADE_RATIO
    billing_timeout: float = 30.0
    billing_max_attempts: int = 5
    billing_page_size: int = 1000
    #: ``CREDITSYNC_REPORT_RETENTION_DAYS``: mismatch reports (and stored run values) older than this are pruned
    report_retention_days: int = DEFAULT_REPORT_RETENTION_DAYS
    #: ``CREDITSYNC_FRAME_ANCESTORS``: the CSP ``frame-ancestors`` sources of ``GET /billing``
    frame_ancestors: str = DEFAULT_FRAME_ANCESTORS

    def require_database_url(self) -> str:
        """``DATABASE_URL``, or a one-line :class:`SettingsError` naming what to set."""
        if not self.database_url.strip():
            raise SettingsError(
                "DATABASE_URL is not set: give the app database's SQLAlchemy URL, "
                "e.g. postgresql+psycopg2://user@host/app or sqlite:////var/lib/app/app.db"
            )
        return self.database_url.strip()
    #: ``CREDITSYNC_REPORTS_DIR``: where the full sync writes its mismatch reports (the
    #: Dagster run and ``serve`` both need it); empty: ``$DAGSTER_HOME/storage/creditsync_reports``
    reports_dir: str = ""
    #: ``CREDITSYNC_PUBLIC_URL``: the base URL of ``creditsync serve`` as an operator's
    #: browser reaches it (the Dagster report links to its ``/reports/`` route); empty: no link
    public_url: str = ""

    def report_folder(self, dagster_storage_dir: str | None = None) -> Path | None:
        """The report folder: ``reports_dir``, else under Dagster's storage (None: unknown)."""
        if self.reports_dir:
            return Path(self.reports_dir)
        if dagster_storage_dir is None:
            home = os.environ.get("DAGSTER_HOME", "")
            if not home:
                return None
            dagster_storage_dir = os.path.join(home, "storage")
        return Path(dagster_storage_dir) / "creditsync_reports"

    def require_billing_token(self) -> str:
        if not self.billing_api_token:
            raise SettingsError("BILLING_API_TOKEN is not set")
        return str(self.billing_api_token)

    def secrets(self) -> list[str]:
        """Every secret value set (for defensive masking of text that leaves the process)."""
        values = [
            self.billing_api_token, self.app_secret, self.webhook_secret,
            self.wix.app_secret, self.stripe.api_key, self.stripe.webhook_secret,
        ]
        return [str(v) for v in values if v and len(str(v)) >= 4]


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _ratio(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name} must be between 0 and 1, got {value}")
    return value


#: a host name (IDN letters allowed) or an IP address (IPv6 without its brackets, as urlsplit gives it)
_HOST_RE = re.compile(r"[\w.\-~%:]+")


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    """An absolute http(s) URL; the value is never echoed (it may carry a password)."""
    raw = (env.get(name) or "").strip() or default
    try:
        parts = urlsplit(raw)
        ok = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and not any(c.isspace() or not c.isprintable() for c in raw)
            and _HOST_RE.fullmatch(parts.hostname or "") is not None
        )
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(f"{name} must be an absolute http(s) URL such as https://billing.example.com")
    return raw


def _text_or_file(env: Mapping[str, str], name: str) -> str:
    """A setting given as its text or as the path of a file holding it."""
    raw = (env.get(name) or "").strip()
    if not raw or raw.startswith(("-----BEGIN", "{")):
        return raw
    path = Path(raw).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"{name}: cannot read {path}: {reason}") from None


#: one CSP source a marketplace dashboard needs: 'self', 'none', or [scheme://]host[:port] (host may start "*.")
_FRAME_SOURCE_RE = re.compile(
    r"'self'|'none'|(?:https?://)?(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::(?:\d{1,5}|\*))?/?"
)


def _frame_ancestors(env: Mapping[str, str]) -> str:
    """``CREDITSYNC_FRAME_ANCESTORS``: space-separated CSP sources, never a wildcard that lets anyone frame."""
    raw = (env.get("CREDITSYNC_FRAME_ANCESTORS") or "").strip()
    if not raw:
        return DEFAULT_FRAME_ANCESTORS
    sources = raw.split()
    for source in sources:
        host = source.split("://", 1)[-1]
        if not _FRAME_SOURCE_RE.fullmatch(source) or (host.startswith("*.") and "." not in host[2:].split(":")[0]):
            raise SettingsError(
                "CREDITSYNC_FRAME_ANCESTORS must be space-separated origins such as "
                "\"'self' https://manage.wix.com\" (no *, no bare scheme, no ';')"
            )
    if "'none'" in sources and len(sources) > 1:
        raise SettingsError("CREDITSYNC_FRAME_ANCESTORS: 'none' cannot be combined with other sources")
    return " ".join(sources)


def _plan_map(env: Mapping[str, str]) -> dict[str, str]:
    text = _text_or_file(env, "CREDITSYNC_PLAN_MAP")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"CREDITSYNC_PLAN_MAP is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in doc.items()):
        raise SettingsError('CREDITSYNC_PLAN_MAP must be a JSON object of strings, e.g. {"price_pro_monthly": "pro"}')
    return dict(doc)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``os.environ`` (or the mapping given)."""
    env = dict(os.environ if env is None else env)
    provider = (env.get("BILLING_PROVIDER") or "generic").strip().lower()
    if provider not in PROVIDERS:
        raise SettingsError(f"BILLING_PROVIDER must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    rate_limit = _int(env, "CREDITSYNC_SYNC_RATE_LIMIT", DEFAULT_SYNC_RATE_LIMIT)
    if rate_limit < 1:
        raise SettingsError(f"CREDITSYNC_SYNC_RATE_LIMIT must be at least 1, got {rate_limit}")
    page_size = _int(env, "BILLING_API_PAGE_SIZE", 1000)
    if not 1 <= page_size <= 1000:
        raise SettingsError(f"BILLING_API_PAGE_SIZE must be between 1 and 1000, got {page_size}")
    wix_concurrency = _int(env, "WIX_CONCURRENCY", DEFAULT_WIX_CONCURRENCY)
    if not 1 <= wix_concurrency <= 256:
        raise SettingsError(f"WIX_CONCURRENCY must be between 1 and 256, got {wix_concurrency}")
    receiver_workers = _int(env, "CREDITSYNC_RECEIVER_WORKERS", DEFAULT_RECEIVER_WORKERS)
    if not 0 <= receiver_workers <= 32:
        raise SettingsError(f"CREDITSYNC_RECEIVER_WORKERS must be between 0 and 32, got {receiver_workers}")
    retention = _int(env, "CREDITSYNC_REPORT_RETENTION_DAYS", DEFAULT_REPORT_RETENTION_DAYS)
    if retention < 1:
        raise SettingsError(f"CREDITSYNC_REPORT_RETENTION_DAYS must be at least 1, got {retention}")
    metadata_key = (env.get("STRIPE_INSTANCE_METADATA_KEY") or DEFAULT_STRIPE_METADATA_KEY).strip()
    if not 1 <= len(metadata_key) <= 40:
        raise SettingsError("STRIPE_INSTANCE_METADATA_KEY must be 1 to 40 characters (Stripe's metadata key limit)")
    return Settings(
        database_url=(env.get("DATABASE_URL") or "").strip(),
        billing_provider=provider,
        billing_api_url=_url(env, "BILLING_API_URL", DEFAULT_BILLING_API_URL),
        billing_api_token=Secret(env.get("BILLING_API_TOKEN", "")),
        plan_map=_plan_map(env),
        wix=WixSettings(
            app_id=env.get("WIX_APP_ID", ""),
            app_secret=Secret(env.get("WIX_APP_SECRET", "")),
            api_base=_url(env, "WIX_API_BASE", DEFAULT_WIX_API_BASE),
            webhook_public_key=_text_or_file(env, "WIX_WEBHOOK_PUBLIC_KEY"),
            concurrency=wix_concurrency,
        ),
        stripe=StripeSettings(
            api_key=Secret(env.get("STRIPE_API_KEY", "")),
            api_base=_url(env, "STRIPE_API_BASE", DEFAULT_STRIPE_API_BASE),
            instance_metadata_key=metadata_key,
            webhook_secret=Secret(env.get("STRIPE_WEBHOOK_SECRET", "")),
        ),
        app_secret=Secret(env.get("CREDITSYNC_APP_SECRET", "")),
        webhook_secret=Secret(env.get("CREDITSYNC_WEBHOOK_SECRET", "")),
        sync_rate_limit=rate_limit,
        receiver_workers=receiver_workers,
        max_change_ratio=_ratio(env, "CREDITSYNC_MAX_CHANGE_RATIO", DEFAULT_MAX_CHANGE_RATIO),
        max_paid_downgrade_ratio=_ratio(env, "CREDITSYNC_MAX_PAID_DOWNGRADE_RATIO", DEFAULT_MAX_PAID_DOWNGRADE_RATIO),
        billing_timeout=_float(env, "BILLING_API_TIMEOUT", 30.0),
        billing_max_attempts=_int(env, "BILLING_API_MAX_ATTEMPTS", 5),
        billing_page_size=page_size,
        report_retention_days=retention,
        frame_ancestors=_frame_ancestors(env),
        reports_dir=(env.get("CREDITSYNC_REPORTS_DIR") or "").strip(),
        public_url=_url(env, "CREDITSYNC_PUBLIC_URL", "").rstrip("/") if (env.get("CREDITSYNC_PUBLIC_URL") or "").strip() else "",
    )
