"""Talking to the Hugging Face Hub: its repo id rules, and one-line errors for what the network or the
Hub refuses (huggingface_hub raises transport errors of its HTTP library, and its own HTTP errors).
Imports no torch: the runtime uses it."""
from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import HubError, UsageError

__all__ = ["check_repo_id", "hub_errors", "redacted"]

_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+@")
_FAILED_REQUEST = re.compile(r"(?:'(?P<error>.*)'|HTTP Error (?P<status>\d+)) thrown while requesting ")


def redacted(text: str) -> str:
    """``text`` without the credentials of any URL in it (``HF_ENDPOINT=https://user:token@mirror``, a proxy's)."""
    return _CREDENTIALS.sub("***@", text)


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` by the Hub's own rules (huggingface_hub's validator), or a UsageError saying why not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise UsageError(f"repo id {repo_id!r} is not of the form ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"repo id {repo_id!r} is not of the form ORG/NAME the Hub accepts: "
                         f"{str(e).split(':')[0]}") from None
    return repo_id


class _RedactCredentials(logging.Filter):
    """huggingface_hub logs the URL of every request it retries, an endpoint's credentials with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redacted(record.getMessage()), ()
        return True


def _retry_seconds() -> str:
    """How long huggingface_hub's back-off waits in all, by the defaults of its ``http_backoff`` (nothing where a
    version of it names them otherwise: a log line must not fail the download it reports on)."""
    from huggingface_hub.utils import http_backoff

    try:
        defaults = {k: p.default for k, p in inspect.signature(http_backoff).parameters.items()}
        wait, total = defaults["base_wait_time"], 0.0
        for _ in range(defaults["max_retries"]):
            total, wait = total + wait, min(defaults["max_wait_time"], wait * 2)
    except (KeyError, TypeError, ValueError):
        return ""
    return f" for up to {total:.0f} s"


class _OneLineForRetries(logging.Filter):
    """huggingface_hub logs two lines for every retry of a request that fails (a refused connection, an HTTP 503),
    up to five times: the first becomes one line that says what is happening and for how long, the rest go."""

    def __init__(self, action: str, where: str):
        super().__init__()
        self.action, self.where, self.said = action, where, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Retrying in "):
            return False
        failed = _FAILED_REQUEST.match(message)
        if failed is None:
            return True
        if self.said:
            return False
        self.said = True
        answer = f"answered HTTP {failed['status']}" if failed["status"] else f"did not answer ({failed['error']})"
        record.msg, record.args = (f"{self.action}: the Hub at {self.where} {answer}; huggingface_hub retries"
                                   f"{_retry_seconds()} (Ctrl-C stops it)"), ()
        return True


def _hub_loggers() -> list[logging.Logger]:
    """huggingface_hub's loggers. A filter on the logger that makes a record sees it before any handler does:
    huggingface_hub's own, and those of an application that configures logging, to which its records propagate."""
    return [logger for name, logger in logging.Logger.manager.loggerDict.items()
            if name.split(".")[0] == "huggingface_hub" and isinstance(logger, logging.Logger)]


@contextmanager
def _hub_logs(action: str, where: str) -> Iterator[None]:
    """huggingface_hub's log lines with no credentials in them, and one line for its retries of a request."""
    loggers = _hub_loggers()
    retries = _OneLineForRetries(action, where)
    for logger in loggers:
        if not any(isinstance(f, _RedactCredentials) for f in logger.filters):
            logger.addFilter(_RedactCredentials())
        logger.addFilter(retries)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(retries)


def _is_transport_error(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in _TRANSPORT_MODULES for c in type(e).__mro__)


@contextmanager
def hub_errors(action: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn what huggingface_hub raises into a HubError that says what failed and what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    where = redacted(endpoint or constants.ENDPOINT)
    try:
        with _hub_logs(action, where):
            yield
    except hf.RepositoryNotFoundError:
        raise HubError(f"{action}: no such repository on {where}, or your token cannot see it "
                       "(set HF_TOKEN or run `hf auth login`)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{action}: no such revision on {where}") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{action}: HF_HUB_OFFLINE is set and huggingface_hub's cache does not hold it "
                           "(unset HF_HUB_OFFLINE to download it)") from None
        cause = e.__cause__
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, hf.HfHubHTTPError) and status is not None:
            raise HubError(f"{action}: the Hub at {where} answered HTTP {status} and nothing is cached "
                           "(the Hub is down or limits your requests: try again later)") from None
        why = f" ({type(cause).__name__}: {redacted(str(cause))})" if _is_transport_error(cause) else ""
        raise HubError(f"{action}: cannot reach the Hub at {where}{why} and nothing is cached "
                       "(check your network, HF_ENDPOINT and HF_HUB_OFFLINE)") from None
    except hf.EntryNotFoundError as e:
        raise HubError(f"{action}: {redacted(str(e).splitlines()[0])}") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (check HF_TOKEN or run `hf auth login`)" if status in (401, 403) else ""
        raise HubError(f"{action}: the Hub at {where} refused: {redacted(str(e).splitlines()[0])}{hint}") from None
    except Exception as e:
        if not _is_transport_error(e):
            raise
        raise HubError(f"{action}: cannot reach the Hub at {where} ({type(e).__name__}: {redacted(str(e))}); "
                       "check your network and HF_ENDPOINT") from None
