"""Settings: defaults, then the TOML config file, then the environment, then the command line.

Every option is documented in ``config.example.toml``. Unknown keys and wrong types are
usage errors (one line, exit 2), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from migrator.engine import timetable
from migrator.errors import UsageError

DEFAULT_LEDGER = "sqlite:///migrator.ledger.db"
# Concurrent transfers: the ceiling of the self-tuning concurrency when not given (high
# enough for long links: a 100 ms round trip wants several dozen transfers at once), and
# the concurrency of a fixed (not adaptive) run when not given.
DEFAULT_CEILING = 64
DEFAULT_FIXED = 8


@dataclass(frozen=True)
class RetryPolicy:
    """Per-instance retries: exponential backoff with full jitter, then `failed`."""

    max_attempts: int = 8
    backoff_initial: float = 1.0
    backoff_max: float = 120.0


@dataclass(frozen=True)
class Settings:
    """Everything a command may need; built by `load_settings`."""

    ledger: str = DEFAULT_LEDGER
    # The ceiling of the self-tuning concurrency, or the concurrency when not adaptive.
    concurrency: int = DEFAULT_CEILING
    source_url: str | None = None
    source_username: str | None = None
    source_password: str | None = field(default=None, repr=False)
    target_url: str | None = None
    target_username: str | None = None
    target_password: str | None = field(default=None, repr=False)
    source_ca_file: str | None = None
    target_ca_file: str | None = None
    # Bearer tokens for DICOMweb ends (`[source] token`, MIGRATOR_SOURCE_TOKEN...).
    source_token: str | None = field(default=None, repr=False)
    target_token: str | None = field(default=None, repr=False)
    # DIMSE ends: our AE title, how instances are retrieved ("get": C-GET, "move": C-MOVE
    # to our own storage SCP on `dimse_move_port`, 0: any free port).
    dimse_aet: str = "MIGRATOR"
    dimse_retrieve: str = "get"
    dimse_move_port: int = 0
    retry: RetryPolicy = RetryPolicy()
    # Seconds without a single answer from an endpoint before the run gives up (exit 3).
    outage_timeout: float = 600.0
    timeout: float = 60.0
    connect_timeout: float = 10.0
    lease_seconds: float = 120.0
    page_size: int = 1000
    progress: str = "auto"
    # Throttling (see migrator.engine.throttle / migrator.engine.timetable): kept as the user wrote
    # them, parsed by the scheduler's gate; validated below.
    max_rate: str | None = None
    max_bandwidth: str | None = None
    # Bytes of instance data one process holds at once (files being read and sent).
    max_memory: str = "1Gi"
    windows: tuple[str, ...] = ()
    # Self-tuning concurrency (False: exactly `concurrency` transfers at once).
    adaptive: bool = True
    # Instances per request each way (ZIP archives): 0 decides from the measured round
    # trips, 1 sends each instance alone.
    batch: int = 0


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "ledger": str,
    "concurrency": int,
    "outage_timeout": (int, float),
    "timeout": (int, float),
    "connect_timeout": (int, float),
    "lease_seconds": (int, float),
    "page_size": int,
    "progress": str,
    "batch": int,
}
_ENDPOINT_KEYS = ("url", "username", "password", "ca_file", "token")
_DIMSE_KEYS: dict[str, type | tuple[type, ...]] = {
    "aet": str,
    "retrieve": str,
    "move_port": int,
}
_RETRY_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_attempts": int,
    "backoff_initial": (int, float),
    "backoff_max": (int, float),
}


def _check(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise UsageError(f"config: {name} must be a {want}, not {type(value).__name__}")
    return value


def _from_mapping(data: dict[str, Any], base: Settings) -> Settings:
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SCALARS:
            changes[key] = _check(key, value, _SCALARS[key])
        elif key in ("source", "target"):
            if not isinstance(value, dict):
                raise UsageError(f"config: [{key}] must be a table")
            for sub, subval in value.items():
                if sub not in _ENDPOINT_KEYS:
                    raise UsageError(f"config: unknown key {key}.{sub}")
                changes[f"{key}_{sub}"] = _check(f"{key}.{sub}", subval, str)
        elif key == "dimse":
            if not isinstance(value, dict):
                raise UsageError("config: [dimse] must be a table")
            for sub, subval in value.items():
                if sub not in _DIMSE_KEYS:
                    raise UsageError(f"config: unknown key dimse.{sub}")
                changes[f"dimse_{sub}"] = _check(f"dimse.{sub}", subval, _DIMSE_KEYS[sub])
        elif key == "throttle":
            changes.update(timetable.settings_from_toml(value))
        elif key == "retry":
            if not isinstance(value, dict):
                raise UsageError("config: [retry] must be a table")
            retry = {}
            for sub, subval in value.items():
                if sub not in _RETRY_KEYS:
                    raise UsageError(f"config: unknown key retry.{sub}")
                retry[sub] = _check(f"retry.{sub}", subval, _RETRY_KEYS[sub])
            changes["retry"] = replace(base.retry, **retry)
        else:
            raise UsageError(f"config: unknown key {key!r}")
    return replace(base, **changes)


def _from_env(env: dict[str, str], base: Settings) -> Settings:
    changes: dict[str, Any] = {}
    if env.get("MIGRATOR_LEDGER"):
        changes["ledger"] = env["MIGRATOR_LEDGER"]
    if env.get("MIGRATOR_PROGRESS"):
        changes["progress"] = env["MIGRATOR_PROGRESS"]
    for role in ("source", "target"):
        for sub in ("username", "password", "ca_file", "token"):
            value = env.get(f"MIGRATOR_{role.upper()}_{sub.upper()}")
            if value is not None:
                changes[f"{role}_{sub}"] = value
    return replace(base, **changes)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file, turning every problem into a one-line UsageError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory") from None
    except PermissionError:
        raise UsageError(f"config file {path} cannot be read (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"config file {path} cannot be read: {exc}") from None


def load_settings(
    config: Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from defaults, `config` (or $MIGRATOR_CONFIG), the environment and
    `overrides` (command-line values; None means "not given")."""
    env = dict(os.environ) if env is None else env
    settings = Settings()
    if config is None and env.get("MIGRATOR_CONFIG"):
        config = Path(env["MIGRATOR_CONFIG"])
    chosen = overrides.get("concurrency") is not None
    if config is not None:
        data = read_config_file(config)
        chosen = chosen or "concurrency" in data
        settings = _from_mapping(data, settings)
    settings = _from_env(env, settings)
    known = {f.name for f in fields(Settings)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    settings = replace(settings, **given)
    if not settings.adaptive and not chosen:
        # A fixed run without a number keeps the concurrency runs had before they tuned
        # themselves, not the self-tuning's ceiling.
        settings = replace(settings, concurrency=DEFAULT_FIXED)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Reject values that cannot work, with one line each."""
    if not 1 <= settings.concurrency <= 512:
        raise UsageError("concurrency must be between 1 and 512")
    if settings.page_size < 1 or settings.page_size > 100_000:
        raise UsageError("page_size must be between 1 and 100000")
    for name in ("timeout", "connect_timeout", "lease_seconds", "outage_timeout"):
        # TOML has nan and inf: `nan <= 0` is False, so test the good range instead.
        if not 0 < getattr(settings, name) < math.inf:
            raise UsageError(f"{name} must be a positive number of seconds")
    retry = settings.retry
    if retry.max_attempts < 1:
        raise UsageError("retry.max_attempts must be at least 1")
    if not 0 <= retry.backoff_initial <= retry.backoff_max < math.inf:
        raise UsageError("retry: need 0 <= backoff_initial <= backoff_max (in seconds)")
    if not 0 <= settings.batch <= 256:
        raise UsageError("batch must be between 1 and 256 (0: decided from the round trips)")
    if settings.progress not in ("auto", "bar", "plain", "none"):
        raise UsageError("progress must be one of auto, bar, plain, none")
    if settings.dimse_retrieve not in ("get", "move"):
        raise UsageError("dimse.retrieve must be get or move")
    if not 0 <= settings.dimse_move_port <= 65535:
        raise UsageError("dimse.move_port must be between 0 and 65535")
    if not 0 < len(settings.dimse_aet.strip()) <= 16:
        raise UsageError("dimse.aet must be 1 to 16 characters")
    if not settings.ledger.strip():
        raise UsageError("ledger URL is empty")
    timetable.validate_settings(settings)
