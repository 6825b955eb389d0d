"""Figures drawn, rendered and written beside training: a worker thread per process, a figure process beside it.

A monitor figure costs about a tenth of a second of matplotlib (the artists, ``canvas.draw``, the PNG), which on
a small model is a hundred training steps. The recorder therefore hands each figure to this module as a job: a
drawing callable over plain data (the probe's last summaries: Python numbers and short lists, never a live
tensor) and what writes the image. Jobs run one at a time, in the order given, on a daemon thread started by the
first job; only rank zero writes, so under DDP only rank zero ever starts one.

- **Off the interpreter lock**: drawing is Python code, and a thread that draws holds the GIL the training loop
  needs (on a 0.5 ms step the loop is mostly Python). So the worker thread sends each drawing, pickled, to one
  helper process (``python callbacks/_background.py``, started with the first figure, at a lower CPU priority)
  which draws and renders it, and writes it for TensorBoard into event files of its own (``{log_dir}/figures``):
  the PNG encoding (~50 ms a figure) and the records' checksums (pure Python in TensorBoard without TensorFlow,
  ~17 ms for a 200 kB PNG) would otherwise hold this process's GIL. The helper sends the RGB array back only for
  the writers that take one (W&B, MLflow). A drawing that does not pickle (a closure) is drawn on the worker
  thread and its array written by the helper; every drawing is drawn and written here if the helper cannot start
  or dies.
- **Thread safety**: matplotlib's ``pyplot`` is not thread-safe and is never used; every figure is a
  ``matplotlib.figure.Figure`` with its own Agg canvas, created and drawn inside the job. The writers a job
  calls are thread-safe where it matters (TensorBoard's ``SummaryWriter`` queues events under a lock).
- **Bounded, nothing dropped**: at most ``MAX_JOBS`` jobs wait; a full queue blocks the training thread until
  the worker has taken one (back-pressure, so memory stays bounded and no figure is lost). A fit makes a few
  tens of figures at most, so in practice it never blocks.
- **Flushed**: :meth:`Worker.flush` waits until every job given so far has finished; the recorder calls it on an
  exception and in ``teardown``, before the loggers close. Each figure job ends by flushing its writers, so a run
  killed after a figure was written still has it on disk.
- **Errors**: a job that raises is handed to its ``on_error`` (on the worker's thread), never raised: training
  never stops for a figure. The recorder keeps them and reports the first of a fit, on its own thread, as one
  ``HealthWarning``.

Left out on purpose: dropping jobs when the queue is full (a figure the user expects would silently be missing),
and a pool of figure processes (one keeps up with the few figures of a fit).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["MAX_JOBS", "Worker", "close_runs", "render", "send_scalars", "worker", "write_scalars"]

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


# ---------------------------------------------------------------------------------------- the figure process
Drawing = Callable[[], "Figure | None"]
_HEADER = struct.Struct("<Q")  # each message: its length, then a pickle


def _send(stream: IO[bytes], obj: Any) -> None:
    _write(stream, _message(obj))


def _message(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write(stream: IO[bytes], message: bytes) -> None:
    stream.write(message)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other end closed the pipe")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other end closed the pipe")
    return pickle.loads(data)


def _rendered(draw: Drawing) -> np.ndarray | None:
    """``draw()`` rendered to an ``(H, W, 3)`` uint8 array (None: nothing to draw)."""
    from callbacks.figures import figure_to_array

    fig = draw()
    return None if fig is None else figure_to_array(fig)


class _FigureProcess:
    """The helper process: receives pickled requests on its stdin, answers on its stdout (see :func:`_serve`)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), MPLBACKEND="Agg")
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.process = subprocess.Popen(
            # this file as a script: it reads its input before importing anything heavy (``-m`` would import the
            # package, torch and Lightning, first), so a request never waits for the helper's start-up
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def tell(self, request: tuple[Any, ...]) -> None:
        """Sends a request that gets no answer (any thread)."""
        assert self.process.stdin is not None
        message = _message(request)  # pickled before the lock: a large drawing never holds up the scalars
        with _SEND_LOCK:
            _write(self.process.stdin, message)

    def ask(self, request: tuple[Any, ...]) -> Any:
        """Sends a request and waits for its answer (the worker thread only: it alone reads the answers)."""
        stdout = self.process.stdout
        assert stdout is not None
        self.tell(request)
        ok, value = _receive(stdout)
        if not ok:
            raise value
        return value

    def cpu_seconds(self) -> float:
        """Its user + system CPU time so far (Linux; 0.0 elsewhere), for the benchmarks."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()  # the helper exits at the end of its input
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


_PROCESS: _FigureProcess | None = None
_PROCESS_FAILED = False  # the helper could not start or died: draw on the worker thread from then on
_PROCESS_LOCK = threading.Lock()  # started by the worker thread (a figure) or the training thread (scalars)
_SEND_LOCK = threading.Lock()  # one request at a time on the helper's stdin
#: TensorBoard writers of this process, by folder: used only once the helper has failed
_HERE: dict[str, Any] = {}
#: seconds between two messages of per-layer scalars to the helper (TensorBoard reloads every 5 s)
SCALARS_EVERY_S = 1.0
_SCALARS: list[tuple[dict[str, dict[str, float]], int]] = []  # kept by `write_scalars`, not sent yet
_SCALARS_SENT = [0.0]  # when they were last sent (time.monotonic)
_SCALARS_LOCK = threading.Lock()


def _helper() -> _FigureProcess | None:
    """The running figure process, started if needed; None once it has failed (draw and write here)."""
    global _PROCESS
    if _PROCESS_FAILED:
        return None
    with _PROCESS_LOCK:
        if _PROCESS is None or _PROCESS.process.poll() is not None:
            _PROCESS = _FigureProcess()
        return _PROCESS


def write_scalars(runs: dict[str, dict[str, float]], step: int) -> None:
    """Writes each folder's ``{tag: value}`` as one TensorBoard event at ``step``, in the figure process: kept here
    and sent at most every :data:`SCALARS_EVERY_S` seconds, several steps in one message, never waited for. Each
    message costs the training thread a pipe write (a few us idle, ~0.2 ms when the helper is drawing on the other
    core: the write wakes its reader), instead of an event, a queue put and TensorBoard's pure-Python checksum per
    folder and step. What is kept is sent by :func:`send_scalars` (the recorder calls it before the loggers close),
    and the events are on disk at the latest when :func:`close_runs` closes their folder, or when this process
    dies (the helper then closes every writer; up to :data:`SCALARS_EVERY_S` of them not sent yet are lost with it,
    the same values stay in the main run). Here, at once, once the helper has failed."""
    if not runs:
        return
    with _SCALARS_LOCK:
        _SCALARS.append((runs, step))
    if _PROCESS_FAILED or time.monotonic() - _SCALARS_SENT[0] >= SCALARS_EVERY_S:
        send_scalars()


def send_scalars() -> None:
    """Sends the scalars :func:`write_scalars` keeps (any thread; at once if none)."""
    global _PROCESS_FAILED
    with _SCALARS_LOCK:
        batch = list(_SCALARS)
        _SCALARS.clear()
        _SCALARS_SENT[0] = time.monotonic()
    if not batch:
        return
    try:
        helper = _helper()
        if helper is not None:
            helper.tell(("scalars", batch))
            return
    except OSError:  # the helper broke
        _PROCESS_FAILED = True
    for runs, step in batch:
        _write_scalars(_HERE, runs, step)


def render(
    draw: Drawing, image_dirs: tuple[str, ...] = (), tag: str = "", step: int = 0, want_array: bool = True
) -> np.ndarray | None:
    """``draw()`` rendered to an ``(H, W, 3)`` uint8 array, in the figure process when ``draw`` pickles; also written
    as TensorBoard image ``tag`` at ``step`` into each folder of ``image_dirs`` (event files of their own, written
    and flushed by the figure process: the PNG encoding and the records' checksums, pure Python in TensorBoard, stay
    off this process's interpreter lock).

    Called on the worker thread. Returns the array when ``want_array`` (for the writers that take one), else None;
    None too when ``draw`` has nothing to draw. An error raised by ``draw`` itself is raised here (in the figure
    process or not); a figure process that cannot start or dies is replaced by drawing and writing here, for the rest
    of the process.
    """
    global _PROCESS_FAILED
    try:
        payload: bytes | None = pickle.dumps(draw, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # a closure, a lambda, an object that holds a lock: drawn here, written there
        payload = None
    image = _rendered(draw) if payload is None else None
    if payload is None and (image is None or not image_dirs):
        return image
    try:
        helper = _helper()
        if helper is not None:
            return helper.ask(("draw", payload, image, image_dirs, tag, step, want_array))
    except (OSError, EOFError, pickle.UnpicklingError):  # the helper broke, not the drawing
        _PROCESS_FAILED = True
    if image is None:
        image = _rendered(draw)
    if image is not None:
        _write_images(_HERE, image_dirs, tag, image, step)
    return image if want_array else None


def close_runs(dirs: list[str]) -> None:
    """Closes the TensorBoard writers of ``dirs`` (their events on disk), after every figure given so far and every
    scalar sent: called at the end of a fit."""

    send_scalars()

    def close() -> None:
        global _PROCESS_FAILED
        if _PROCESS is not None and not _PROCESS_FAILED and _PROCESS.process.poll() is None:
            try:
                _PROCESS.ask(("close", dirs))
            except (OSError, EOFError, pickle.UnpicklingError):
                _PROCESS_FAILED = True
        for d in dirs:
            _close_writer(_HERE, d)

    if _PROCESS is None and not any(d in _HERE for d in dirs):
        return  # nothing was ever written
    worker().submit(close, on_error=lambda e: None)
    worker().flush()


def _writer(writers: dict[str, Any], folder: str) -> Any:
    writer = writers.get(folder)
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter

        writer = writers[folder] = SummaryWriter(folder)
    return writer


def _write_scalars(writers: dict[str, Any], runs: dict[str, dict[str, float]], step: int) -> None:
    from callbacks._internals import write_scalars_event

    for folder, values in runs.items():
        writer = _writer(writers, folder)
        if not write_scalars_event(writer, values, step):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)


def _write_images(writers: dict[str, Any], image_dirs: tuple[str, ...], tag: str, image: np.ndarray, step: int) -> None:
    """Writes ``image`` as TensorBoard image ``tag`` into each folder's event file, flushed (on disk now)."""
    from callbacks._internals import write_image_event

    for d in image_dirs:
        writer = _writer(writers, d)
        if not write_image_event(writer, tag, image, step):
            writer.add_image(tag, image, global_step=step, dataformats="HWC")
        writer.flush()


def _close_writer(writers: dict[str, Any], folder: str) -> None:
    writer = writers.pop(folder, None)
    if writer is not None:
        writer.close()


def figure_process_cpu() -> float:
    """CPU seconds the figure process of this process has used so far (0.0 if none): benchmarks add it to theirs."""
    return _PROCESS.cpu_seconds() if _PROCESS is not None else 0.0


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The figure process's loop, one request at a time, each answered ``(True, value)`` or ``(False, error)``:

    - ``("draw", drawing, image, image_dirs, tag, step, want_array)``: ``drawing`` (pickled; or None with the
      ``image`` already rendered) drawn and rendered, written into ``image_dirs`` and flushed; the value is the array
      when ``want_array``, else None;
    - ``("scalars", [({folder: {tag: value}}, step), ...])``: one event per folder and step, not answered;
    - ``("close", folders)``: those folders' writers closed.

    A thread reads the requests as they come, so the training process never waits on a full pipe while a figure is
    drawn. At the end of its input (the training process closed the pipe, or died) it closes every writer and exits.
    """
    with contextlib.suppress(OSError):
        os.nice(5)  # the training process comes first when the cores are busy
    requests: queue.Queue[Any] = queue.Queue()  # unbounded: the training process's writes never wait for a drawing

    def read() -> None:
        while True:
            try:
                requests.put(_receive(stdin))
            except Exception:  # EOF: the training process closed the pipe or exited; anything else: a broken stream
                requests.put(EOFError())  # the helper exits, and the training process draws and writes itself
                return

    threading.Thread(target=read, name="requests", daemon=True).start()
    writers: dict[str, Any] = {}
    try:
        while True:
            request = requests.get()
            if isinstance(request, EOFError):
                return  # the training process closed the pipe or exited
            try:
                if request[0] == "scalars":
                    for runs, step in request[1]:
                        _write_scalars(writers, runs, step)
                    continue  # no answer
                if request[0] == "close":
                    for d in request[1]:
                        _close_writer(writers, d)
                    answer: tuple[bool, Any] = (True, None)
                else:
                    _, payload, image, image_dirs, tag, step, want_array = request
                    if image is None:
                        image = _rendered(pickle.loads(payload))
                    if image is not None:
                        _write_images(writers, image_dirs, tag, image, step)
                    answer = (True, image if want_array else None)
            except Exception as error:
                answer = (False, error)
            try:
                _send(stdout, answer)
            except (pickle.PicklingError, TypeError, AttributeError):  # an error that does not pickle
                _send(stdout, (False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
    finally:
        for d in list(writers):
            with contextlib.suppress(Exception):
                _close_writer(writers, d)


if __name__ == "__main__":
    answers = os.fdopen(os.dup(1), "wb")  # the protocol's channel; anything printed goes to stderr (discarded)
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, answers)
