"""Where to track: resolving the tracking URI, failing fast on an unreachable server, and the
MLflow client / experiment look-ups every other tracking module shares. Imports MLflow only when a
client is made."""
from __future__ import annotations

import logging
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    import ssl

    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


class TrackingError(RuntimeError):
    """A tracking problem the user can fix (unreachable server, missing experiment, bad URI)."""


_OUTAGE_TEXT = re.compile(r"Max retries exceeded|Connection ?(Error|refused|reset|aborted)|timed? ?out|"
                          r"Temporarily Unavailable|\b50[234]\b|database is locked", re.IGNORECASE)


def is_outage(e: BaseException) -> bool:
    """Whether an error from an MLflow call means the server is away (worth keeping the result and
    retrying later) rather than a bad request: connection errors, timeouts, 502/503/504, and MLflow's
    wrapping of them after its own retries."""
    if isinstance(e, (OSError, TimeoutError)):
        return True
    return bool(_OUTAGE_TEXT.search(f"{type(e).__name__}: {e}"))


ENV_USERNAME, ENV_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def resolve_tracking_uri(cli_value: str | None, spec_value: str | None) -> str:
    """CLI flag > $MLFLOW_TRACKING_URI > the spec's ``tracking_uri`` > ``sqlite:///mlflow.db`` (in the
    working directory). The file store (``./mlruns``) is not a default: recent MLflow refuses it.
    An http(s) URI's credentials are moved out of it (see ``credentials_to_env``)."""
    for value in (cli_value, os.environ.get(ENV_TRACKING_URI), spec_value):
        if value is not None and str(value).strip():
            return credentials_to_env(str(value).strip())
    return DEFAULT_TRACKING_URI


def credentials_to_env(uri: str) -> str:
    """``http(s)://user:pw@host…`` → ``http(s)://host…``, with user and password put where MLflow's client
    reads them ($MLFLOW_TRACKING_USERNAME / _PASSWORD; the URI's replace any there, as they would win
    on the wire too). MLflow honours credentials in the URI but also prints it ("View run … at:
    http://user:pw@…"), and Ray Tune pickles it with the tracking callback into shared storage; a URI
    without them cannot leak them. Other schemes are returned as they are."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() not in ("http", "https") or "@" not in parsed.netloc:
        return uri
    userinfo, _, host = parsed.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    if not sep or not user or not password:
        raise TrackingError(f"tracking URI {redact_uri(uri)}: credentials in a URI must be user:password; for a "
                            "token set $MLFLOW_TRACKING_TOKEN, or set $MLFLOW_TRACKING_USERNAME / _PASSWORD")
    os.environ[ENV_USERNAME], os.environ[ENV_PASSWORD] = unquote(user), unquote(password)
    log.debug("tracking URI %s: credentials moved to $%s / $%s", redact_uri(uri), ENV_USERNAME, ENV_PASSWORD)
    return parsed._replace(netloc=host).geturl()


_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(?:pass|secret|token|key|credential|auth)[^=&#]*=)[^&#]*")


def redact_uri(uri: str) -> str:
    """``uri`` as it may be shown or recorded: the password of its userinfo (``user:***@``; a userinfo
    without a password may itself be a token: ``***@``) and the values of query parameters named like
    a credential replaced by ``***``. Every message, log line, tag or param that names a tracking URI
    goes through this: the URI itself may carry credentials (``http://user:pw@host``), and MLflow
    honours them."""
    text = str(uri)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@", text)
    if m:
        user, sep, _ = m.group(2).partition(":")
        shown = f"{user}:***" if sep else "***"
        text = f"{m.group(1)}{shown}@{text[m.end():]}"
    return _SECRET_QUERY.sub(r"\1***", text)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a credential that ``redact_uri`` would hide."""
    return redact_uri(uri) != str(uri)


def check_reachable(uri: str, timeout_s: float = 10, *, must_exist: bool = False) -> None:
    """Fail fast with a clear message instead of MLflow's retry loop (7 retries with exponential
    backoff and a 120 s request timeout by default, i.e. minutes before the first error).

    http(s): GET ``<uri>/health`` (the endpoint ``mlflow server`` provides) with ``timeout_s``; only
    a refused/timed-out connection is an error (any HTTP answer means a server is there — a proxy or
    an auth layer may answer /health with 401/404). sqlite: the database's folder must exist. file
    store: refused by recent MLflow, so say what to use instead. ``must_exist`` (readers): the sqlite
    file itself must exist, since MLflow would otherwise create an empty database there.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    shown = redact_uri(uri)
    if scheme in ("http", "https"):
        # /health needs no credentials, and urllib would read ``user:pw@host`` as the host name
        url = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s, context=_tls_context()) as resp:  # noqa: S310
                resp.read(64)
        except urllib.error.HTTPError as e:
            log.warning("MLflow tracking server at %s answered /health with HTTP %s; carrying on", shown, e.code)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {shown}: {reason}; start it (e.g. `mlflow server "
                f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`) or pass --tracking-uri "
                f"(e.g. --tracking-uri {DEFAULT_TRACKING_URI} for a local file)") from None
    elif scheme == "sqlite":
        db = sqlite_path(uri)
        if db is not None and not db.parent.is_dir():
            raise TrackingError(f"tracking URI {shown}: the folder {db.parent} does not exist; create it or pass "
                                f"--tracking-uri {DEFAULT_TRACKING_URI}")
        if must_exist and db is not None and not db.is_file():
            raise TrackingError(f"tracking URI {shown}: no MLflow database at {db}; pass the --tracking-uri the "
                                "sweep used (or set $MLFLOW_TRACKING_URI)")
    elif scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(f"tracking URI {shown!r} is an MLflow file store, which recent MLflow refuses; use a "
                            f"database such as {DEFAULT_TRACKING_URI} (migrate old runs with `mlflow "
                            "migrate-filestore`) or an http(s):// tracking server")


def _tls_context() -> "ssl.SSLContext":
    """Honour the TLS settings the MLflow client itself reads, so the check agrees with MLflow."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (``sqlite:///rel.db``, ``sqlite:////abs.db``); None in memory."""
    rest = uri[len("sqlite://"):]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:].split("?")[0])


def client(uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: "MlflowClient", name: str) -> str | None:
    exp = client.get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def require_experiment(client: "MlflowClient", uri: str, name: str) -> str:
    exp_id = experiment_id(client, name)
    if exp_id is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment named {name!r} at {redact_uri(uri)} (one experiment per sweep name); "
                            f"experiments there: {', '.join(names) or '(none)'}")
    return exp_id


def default_artifact_location(uri: str, experiment_name: str) -> str | None:
    """Artifacts of a SQLite-tracked sweep live next to the database (not in whatever directory the
    sweep happened to start from); servers decide for themselves (proxied artifacts)."""
    if not uri.startswith("sqlite:"):
        return None
    db = sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).strip("_") or "experiment"
    return (db.resolve().parent / "mlartifacts" / slug).as_uri()




def absolute_sqlite(uri: str) -> str:
    """A relative sqlite URI made absolute, so trial processes and the UI hint work from anywhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri
