"""The one background sweep thread that the dashboard talks to.

API (all methods thread-safe; the dashboard keeps one `SweepService` in `st.cache_resource`):

    service = SweepService(store)
    run_id = service.start(SweepConfig(...))   # SweepBusy if a sweep is running; None if stopped while loading
    run_id = service.resume(run_id)            # continue a stopped / interrupted / failed run
    service.stop()                             # finish the batch in flight, then 'stopped'
    progress = service.status()                # Progress snapshot, or None before any sweep
    service.running                            # is the thread alive?
    service.model(spec)                        # the loaded model, cached per ModelSpec

The thread never calls Streamlit: it writes to the database through its own cursor and hands
`Progress` snapshots to a lock-protected slot that pages poll. That lock is held for moments
only, never through a model load (seconds, or minutes from a hub): a start publishes a
'starting' snapshot (phase 'load') and loads without it, so status reads never wait, and a stop
asked during the load is honoured (no run is created).
"""
from __future__ import annotations

import contextlib
import json
import threading
import traceback
from dataclasses import replace

import numpy  # noqa: F401  imported here, on the caller's thread, before the sweep thread needs it
import pandas  # noqa: F401

from db.store import Store
from runner import checkpoint
from runner.errors import SweepBusy, SweepError
from runner.model import LatentReasoner, ModelSpec, load
from runner.sweep import Progress, Sweep, SweepConfig, prepare


class SweepService:
    def __init__(self, store: Store, loader=load):
        self.store = store
        self._loader = loader
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._starting = False  # a start or resume is loading its model (the lock is not held meanwhile)
        self._stop = threading.Event()
        self._progress: Progress | None = None
        self._before: Progress | None = None  # the snapshot a failed start puts back
        self._models: dict[ModelSpec, LatentReasoner] = {}
        self._model_lock = threading.Lock()

    # --- queries ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """A sweep is starting (its model loading) or sweeping."""
        return self._starting or (self._thread is not None and self._thread.is_alive())

    def status(self) -> Progress | None:
        with self._lock:
            return self._progress

    def model(self, spec: ModelSpec) -> LatentReasoner:
        """Load once per spec; every later sweep and page reuses it. A model no sweep can use (NaN weights,
        no latents) is refused with the CLI's line and not kept."""
        with self._model_lock:
            if spec not in self._models:
                reasoner = self._loader(spec)
                unusable = checkpoint.unusable(reasoner)
                if unusable:
                    raise SweepError(unusable)
                self._models[spec] = reasoner
            return self._models[spec]

    # --- commands ---------------------------------------------------------------------------------
    def start(self, config: SweepConfig) -> int | None:
        """Validate, load the model, create the run (problems stored) and sweep it in the background.

        Returns the run id, or None when a stop came while the model loaded (nothing is created).
        """
        with self._loading(None):
            problems = prepare(config)  # the one validation of this start
            reasoner = self.model(config.model_spec())
            if self._stop.is_set():
                return self._stopped_while_loading(None)
            run_id = Sweep.create(self.store, reasoner, config, problems)
            self._launch(run_id, config, reasoner)
            return run_id

    def resume(self, run_id: int, phases: tuple[str, ...] | None = None) -> int | None:
        """Continue a stopped / interrupted / failed run; None when stopped while its model loaded."""
        with self._loading(run_id):
            row = self.store.run_row(run_id)
            if row is None:
                raise SweepError(f"no run {run_id} in {self.store.path}")
            if row["source"] != "sweep":
                raise SweepError(f"run {run_id} was imported from the old script's files: there is nothing to resume")
            config = SweepConfig.from_json(json.loads(row["config"]))
            if phases:
                config = SweepConfig.from_json({**config.to_json(), "phases": phases})
            reasoner = self.model(config.model_spec())
            if self._stop.is_set():
                return self._stopped_while_loading(run_id)
            self._launch(run_id, config, reasoner)
            return run_id

    @contextlib.contextmanager
    def _loading(self, run_id: int | None):
        """A start or resume between _begin and its thread's launch: a failure puts the last snapshot back."""
        self._begin(run_id)
        try:
            yield
        except BaseException:
            self._publish(self._before)
            raise
        finally:
            self._starting = False

    def stop(self) -> bool:
        """Ask the running sweep to stop after its batch in flight; False when none runs."""
        if not self.running:
            return False
        self._stop.set()
        return True

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- internals --------------------------------------------------------------------------------
    def _refuse_if_running(self) -> None:
        if self.running:
            progress = self._progress
            which = f"run {progress.run_id}" if progress and progress.run_id is not None else "a sweep"
            raise SweepBusy(f"{which} is already running in this process: stop it first (one sweep at a time)")

    def _publish(self, progress: Progress | None) -> None:
        with self._lock:
            self._progress = progress

    def _begin(self, run_id: int | None) -> None:
        """Claim the one sweep slot (SweepBusy if taken) and say 'starting', phase 'load', until the model is in."""
        with self._lock:
            self._refuse_if_running()
            self._starting, self._stop, self._before = True, threading.Event(), self._progress
            self._progress = Progress(run_id, "starting", "load", 0, 0, 0.0)

    def _stopped_while_loading(self, run_id: int | None) -> None:
        self._publish(Progress(run_id, "stopped", "load", 0, 0, 0.0))
        return None

    def _launch(self, run_id: int, config: SweepConfig, reasoner: LatentReasoner) -> None:
        sweep = Sweep(self.store, reasoner, config, run_id, stop=self._stop, on_progress=self._publish)
        row = self.store.run_row(run_id)
        self._publish(Progress(run_id, "running", row["phase"], int(row["done"]), int(row["total"]),
                               float(row["elapsed_s"] or 0.0)))

        def work():
            try:
                sweep.run()
            except Exception as error:  # recorded as 'failed' by the sweep; keep the trace for the server log
                traceback.print_exc()
                with self._lock:  # never leave a dead thread's last snapshot saying 'running'
                    if self._progress is not None and self._progress.status == "running":
                        self._progress = replace(self._progress, status="failed",
                                                 error=self._progress.error or f"{type(error).__name__}: {error}")

        with self._lock:  # started before `_starting` drops: `running` never reads False in between
            self._thread = threading.Thread(target=work, name=f"sweep-run-{run_id}", daemon=True)
            self._thread.start()
