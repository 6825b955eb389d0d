"""The figure worker: figures drawn, rendered and written beside training, on one thread per process.

A monitor figure costs tenths of a second of matplotlib (building the artists, ``canvas.draw``, the PNG), which
on a small model is many training steps. The recorder therefore hands each figure to this worker as a job: a
callable over plain data (the probe's last summaries: Python numbers and short lists, never a live tensor) that
draws, renders and writes it. Jobs run one at a time, in the order given, on a daemon thread started by the first
job; only rank zero writes, so under DDP only rank zero ever starts one.

- **Thread safety**: matplotlib's ``pyplot`` is not thread-safe and is never used; every figure is a
  ``matplotlib.figure.Figure`` with its own Agg canvas, created and drawn inside the job. The writers a job
  calls are thread-safe where it matters (TensorBoard's ``SummaryWriter`` queues events under a lock).
- **Bounded, nothing dropped**: at most ``MAX_JOBS`` jobs wait; a full queue blocks the training thread until
  the worker has taken one (back-pressure, so memory stays bounded and no figure is lost). A fit makes about
  ten figures, so in practice it never blocks.
- **Flushed**: :meth:`Worker.flush` waits until every job given so far has finished; the recorder calls it at the
  end of fit, on an exception and in ``teardown``, before the loggers close. Each figure job ends by flushing
  its writers, so a run killed after a figure was written still has it on disk.
- **Errors**: a job that raises is handed to its ``on_error`` (on the worker's thread), never raised: training
  never stops for a figure. The recorder keeps them and reports the first of a fit, on its own thread, as one
  ``HealthWarning``.

Left out on purpose: a process pool (no GIL contention, but every job would have to be picklable) and dropping
jobs when the queue is full (a figure the user expects would silently be missing).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

__all__ = ["MAX_JOBS", "Worker", "worker"]

#: jobs waiting at most (a fit makes about ten figures; each job holds a few kB of summaries)
MAX_JOBS = 32


class Worker:
    """One thread that runs jobs in order; a job that raises hands its error to its ``on_error``.

    Args:
        max_jobs: jobs waiting at most; :meth:`submit` blocks while that many wait.
        name: the thread's name (seen in ``threading.enumerate()`` and profilers).

    Example::

        w = Worker()
        w.submit(lambda: print("drawn beside training"), on_error=print)
        w.flush()  # prints, then returns
    """

    def __init__(self, max_jobs: int = MAX_JOBS, name: str = "callbacks-figures") -> None:
        if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
            raise ValueError(f"Expected `max_jobs` to be an int >= 1, but got {max_jobs!r}.")
        self.name = name
        self._jobs: queue.Queue[tuple[Callable[[], None], Callable[[Exception], None]]] = queue.Queue(max_jobs)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether its thread has been started in this process (and is alive)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], on_error: Callable[[Exception], None]) -> None:
        """Queues ``job``; blocks while the queue is full. If ``job`` raises, ``on_error(error)`` is called on the
        worker's thread (keep it short and thread-safe, e.g. ``list.append``)."""
        if not self.running:
            with self._start_lock:
                if not self.running:  # first job, or a forked child (threads do not survive ``fork``)
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
        self._jobs.put((job, on_error))

    def flush(self) -> None:
        """Returns once every job submitted so far has finished (at once if none is pending)."""
        if self.running:
            self._jobs.join()

    def _run(self) -> None:
        while True:
            job, on_error = self._jobs.get()
            try:
                job()
            except Exception as error:  # a figure never stops training: its owner reports it
                with contextlib.suppress(Exception):
                    on_error(error)
            finally:
                self._jobs.task_done()


_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def worker() -> Worker:
    """This process's figure worker (created on first use; its thread starts with its first job)."""
    global _WORKER
    if _WORKER is None:
        with _WORKER_LOCK:
            if _WORKER is None:
                _WORKER = Worker()
    return _WORKER
