"""Where a study lives (`--storage URL`), on Optuna's own storages, each with Optuna's heartbeat so that
a trial whose worker died is failed and run again a bounded number of times.

- default: a SQLite file beside the report (WAL mode, a 60 s busy timeout): a few workers on one machine.
- `journal:PATH`: Optuna's JournalStorage on a file, for a filesystem that several machines share.
- `postgresql://...`, `mysql://...` (any SQLAlchemy URL): Optuna's RDBStorage, for workers on many machines.

Every worker of every machine that opens the same URL joins the same study.
"""

from __future__ import annotations

import inspect
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from micro_arch.errors import MicroArchError

SQLITE_BUSY_TIMEOUT_S = 60
OPEN_ATTEMPTS = 4
DRIVERS = {"postgresql": ("psycopg2", "postgres"), "mysql": ("pymysql", "mysql")}  # scheme -> (module, extra)

# Optuna 4.9 renamed RetryFailedTrialCallback and RDBStorage's failed_trial_callback; take whichever is there.
RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback
_CALLBACK_ARG = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                 in inspect.signature(RDBStorage.__init__).parameters else "failed_trial_callback")


def default_url(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def describe(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - printing only
        return url.split("@")[-1]


def open_storage(url: str, heartbeat_s: int, max_retries: int, on_stale: Callable | None = None):
    """An Optuna storage for `url` whose stale trials (no heartbeat for 3 x heartbeat_s) are failed and
    retried at most max_retries times (Optuna's retry callback); on_stale(study, trial) runs first."""
    callback = stale_callback(max_retries, on_stale)
    grace = 3 * heartbeat_s
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise MicroArchError(f"--storage {url}: no folder {path.parent} for the journal file; create it "
                                 "(on a filesystem every worker sees)")
        from optuna.storages.journal import JournalFileBackend

        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_s, grace, callback)
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        _wal(url)
        kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    elif scheme in DRIVERS:
        url = _with_driver(url, scheme)
        kwargs = {"pool_pre_ping": True}
    else:
        raise MicroArchError(f"--storage {url}: unknown kind of storage {scheme!r}; use journal:PATH, "
                             "sqlite:///PATH, postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # Optuna marks the heartbeat experimental
                warnings.simplefilter("ignore")
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=grace,
                                  **{_CALLBACK_ARG: callback})
        except ImportError as err:
            raise MicroArchError(f"--storage {describe(url)}: {err}") from None
        except Exception as err:  # noqa: BLE001 - sqlalchemy's errors, said in one line after the last try
            # Workers of several machines that start at once on a new database race to create Optuna's tables
            # (PostgreSQL: a duplicate key in pg_type); the next attempt finds them made.
            if attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.5 * 2**attempt + random.random())
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MicroArchError(f"--storage {describe(url)}: cannot open the study database: {first}") from None
    raise AssertionError("unreachable")


def _with_driver(url: str, scheme: str) -> str:
    """postgresql:// and mysql:// with the driver that is installed: SQLAlchemy's default for postgresql is
    psycopg 3 since 2.1 (psycopg2 before), and for mysql a C build; the extras install psycopg2 and PyMySQL."""
    head, rest = url.split("://", 1)
    if "+" in head:
        return url  # the user named a driver
    drivers = {"postgresql": ["psycopg2", "psycopg"], "mysql": ["pymysql", "MySQLdb"]}[scheme]
    for module in drivers:
        try:
            __import__(module)
        except ImportError:
            continue
        return f"{scheme}+{module.lower()}://{rest}"
    raise MicroArchError(f"--storage {describe(url)}: no {scheme} driver is installed ({' or '.join(drivers)}); "
                         f"pip install 'micro-arch[{DRIVERS[scheme][1]}]'")


def _wal(url: str) -> None:
    """WAL lets readers (the progress table, other workers) read while one worker writes; it is stored in
    the file, so setting it once is enough."""
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as db:
        db.execute("PRAGMA journal_mode=WAL")


def stale_callback(max_retries: int, on_stale: Callable | None):
    """Optuna's retry callback: the stale trial (already failed) is queued again as a WAITING trial whose
    system attribute retry_history ends with its number, at most max_retries times."""
    with warnings.catch_warnings():  # marked experimental since Optuna 2.8
        warnings.simplefilter("ignore")
        retry = RetryCallback(max_retry=max_retries)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if on_stale is not None:
            on_stale(study, trial)
        retry(study, trial)

    return callback


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat, which Optuna gives only its RDBStorage: a running trial
    records the time in a system attribute every interval; one not heard of for the grace period is stale.
    The clocks of the machines that share the journal are taken to agree within the grace period."""

    def __init__(self, backend, heartbeat_s: int, grace_s: int, callback):
        super().__init__(backend)
        self._heartbeat_s, self._grace_s, self._callback = heartbeat_s, grace_s, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial finished between two beats

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get("heartbeat")
            if beat is not None and now - beat > self._grace_s:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(self):
        return self._callback

    def get_failed_trial_callback(self):  # the name before Optuna 4.9
        return self._callback
