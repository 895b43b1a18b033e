"""Optuna storages from one URL, checked before any trial runs, and the liveness of running trials.

- ``sqlite:///path/study.db``, ``postgresql://user@host/db`` or any SQLAlchemy URL: :class:`optuna.storages.RDBStorage`
  with Optuna's heartbeat (a trial of a killed worker becomes FAIL after ``grace_period`` and is retried).
- ``journal:///abs/path/file.log`` (or ``journal://relative/file.log``): :class:`optuna.storages.JournalStorage`
  on a file; Optuna has no heartbeat for it, so lrk keeps one in the trial's system attributes.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal://"
VALID_URLS = "sqlite:///path/to/study.db, postgresql://user:password@host:5432/db (any SQLAlchemy URL) or journal:///path/to/study.log"
#: system attribute holding the last heartbeat (Unix time) of a running trial in a journal storage
HEARTBEAT_ATTR = "lrk:heartbeat"


def redact(url: str) -> str:
    """The URL with its password hidden (for logs, configs and messages)."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def retry_callback(max_retry: int | None) -> tuple[str, Any]:
    """Optuna's callback that re-queues a stale trial (WAITING, same params), and RDBStorage's keyword for it.

    Optuna 4.9 renamed ``RetryFailedTrialCallback`` / ``failed_trial_callback`` to
    ``RetryHeartbeatStaleTrialCallback`` / ``heartbeat_stale_trial_callback``; lrk accepts Optuna >= 4.0.
    """
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            from optuna.storages import RetryHeartbeatStaleTrialCallback
        except ImportError:  # Optuna < 4.9
            from optuna.storages import RetryFailedTrialCallback

            return "failed_trial_callback", RetryFailedTrialCallback(max_retry=max_retry)
        return "heartbeat_stale_trial_callback", RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 1,
    attempts: int = 5,
) -> Any:
    """Open (and so connect to) the storage at ``url``; one clear :class:`LrkConfigError` when it is unreachable.

    ``heartbeat_interval`` (s, None: off) and ``grace_period`` (s, default 2 x interval) let other workers
    fail the trials of a killed worker; such a trial is then retried up to ``max_retry`` times.
    """
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage, RDBStorage

    if heartbeat_interval is not None and heartbeat_interval <= 0:
        raise LrkConfigError(
            f"hydra.sweeper.heartbeat_interval={heartbeat_interval} is invalid: give seconds > 0, or null to switch it off"
        )
    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL_PREFIX) :])
        if not path.name:
            raise LrkConfigError(
                f"hydra.sweeper.storage={url} names no file: give e.g. journal:///abs/path/study.log"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise LrkConfigError(f"hydra.sweeper.storage={url} is not writable: {exc}") from None

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = redact(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LrkConfigError(f"hydra.sweeper.storage={url} is not a storage URL: give {VALID_URLS}") from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            try:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LrkConfigError(
                    f"hydra.sweeper.storage={url}: cannot create its folder: {exc}"
                ) from None
        # several worker processes share the file: wait for its lock instead of failing at once
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; lrk's dev extra installs psycopg2-binary
        if parsed.drivername == "postgresql" and find_spec("psycopg") is None and find_spec("psycopg2"):
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    callback_key, callback = retry_callback(max_retry)
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    **({callback_key: callback} if heartbeat_interval else {}),
                )
        except (ImportError, ModuleNotFoundError) as exc:
            raise LrkConfigError(
                f"hydra.sweeper.storage={shown} needs a database driver that is not installed ({exc}); "
                "for PostgreSQL: pip install psycopg2-binary"
            ) from None
        except Exception as exc:  # sqlalchemy.exc.OperationalError and friends: one line, no traceback
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
            # two workers creating the same new database race on its tables: try again
            racing = "already exists" in reason or "UNIQUE constraint" in reason or "locked" in reason
            if racing and attempt + 1 < attempts:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise LrkConfigError(
                f"hydra.sweeper.storage={shown} is unreachable ({reason}); give {VALID_URLS}"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


class Liveness:
    """Heartbeats of this worker's running trials, and the failing (then retrying) of other workers' stale ones.

    RDB storages use Optuna's own heartbeat table. A journal storage has none in Optuna, so the heartbeat
    is the ``lrk:heartbeat`` system attribute and a stale trial is failed and re-queued here, with Optuna's
    :func:`retry_callback` as for RDB.
    """

    def __init__(
        self, storage: Any, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None
    ) -> None:
        from optuna.storages import JournalStorage, RDBStorage

        self.storage = storage
        self.interval = heartbeat_interval
        self.grace = grace_period if grace_period is not None else 2 * (heartbeat_interval or 0)
        self.native = isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
        self.journal = isinstance(storage, JournalStorage) and heartbeat_interval is not None
        self.retry = retry_callback(max_retry)[1]
        self._active: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.native or self.journal

    def beat(self, trial_id: int) -> None:
        if self.native:
            self.storage.record_heartbeat(trial_id)
        elif self.journal:
            self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def add(self, trial_id: int) -> None:
        """Start beating for ``trial_id`` (one beat now, then every interval in a thread)."""
        if not self.enabled:
            return
        self.beat(trial_id)
        with self._lock:
            self._active.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrk-heartbeat", daemon=True)
            self._thread.start()

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._active.discard(trial_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            with self._lock:
                active = list(self._active)
            for trial_id in active:
                try:
                    self.beat(trial_id)
                except Exception as exc:  # a lost beat is retried next interval
                    log.warning("heartbeat of trial id %s failed: %s", trial_id, exc)

    def fail_stale(self, study: Any) -> None:
        """Fail the running trials whose worker stopped beating; each is re-queued (WAITING) for a retry."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        if self.native:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            return
        if not self.journal:
            return
        now = time.time()
        study_id = self.storage.get_study_id_from_name(study.study_name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - last <= self.grace:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker failed it first, or it just finished
            log.warning(
                "trial %d had no heartbeat for %.0f s: marked FAIL and queued for a retry",
                trial.number,
                now - last,
            )
            self.retry(study, self.storage.get_trial(trial_id))
