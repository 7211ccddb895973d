"""One retry policy for every byteify task: retry outages, never bad input.

Whether a failure is worth retrying is decided by exception TYPE, along the exception's
cause/context chain (MLflow wraps a refused connection in an ``MlflowException`` raised
while handling the ``requests`` error, so the chain is where the outage shows):

* network and servers: connection refused or reset, timeouts, HTTP clients that gave up
  after their own retries on 429/5xx (requests' ``RetryError``), S3 endpoints unreachable;
* a locked SQLite database (two processes writing the same MLflow store);
* ``TransientError``: what byteify itself raises for a failure that a retry repairs, e.g.
  a training subprocess killed mid-way (the retry resumes from its last checkpoint).

Everything else (bad config, damaged data, a parity failure, a bug) fails at once.
Delays are one integer (the Prefect UI shows a list of delays as "NaN") with jitter, so
several tasks hit by the same outage do not come back in lockstep.
"""

from __future__ import annotations

import sqlite3
from functools import cache


class TransientError(RuntimeError):
    """A failure that a retry repairs (raised by byteify code, e.g. a crashed trainer)."""


@cache
def transient_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "try again later" (imported once, on first use)."""
    import botocore.exceptions as boto
    import requests
    import urllib3.exceptions as u3

    types: list[type[BaseException]] = [
        TransientError,
        ConnectionError,  # refused, reset, aborted (builtin; aiohttp's and asyncio's derive from it or OSError)
        TimeoutError,
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,  # the client's own retries on 429/5xx ran out
        requests.exceptions.ChunkedEncodingError,
        u3.MaxRetryError,
        u3.ProtocolError,
        boto.ConnectionError,
        boto.HTTPClientError,
        sqlite3.OperationalError,  # "database is locked"
    ]
    try:
        import aiohttp

        types.append(aiohttp.ClientConnectionError)  # s3fs talks to S3 through aiohttp
    except ImportError:
        pass
    try:
        from sqlalchemy.exc import OperationalError

        types.append(OperationalError)  # MLflow's SQL store wraps sqlite's lock error in it
    except ImportError:
        pass
    return tuple(types)


def is_transient(exc: BaseException | None) -> bool:
    """True if `exc`, or an exception it was raised from or while handling, is an outage."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, transient_types()):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry outages, fail fast on everything else."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - classified, never swallowed
        return is_transient(exc)
    return False


# Splat into @task(...): every task in tasks/ retries the same way.
RETRY = dict(
    retries=3, retry_delay_seconds=10, retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient
)
