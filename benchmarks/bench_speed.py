"""Training speed of the lecture's BatchNorm MLP: plain PyTorch, the obvious Lightning port, and ours.

Four loops train the same network (makemore part 3's MLP: Embedding(27, 10), context 3,
Linear(30, 200) -> BatchNorm1d -> tanh -> Linear(200, 27)) on the lecture's training split, batch 32,
plain SGD, one intra-op thread, for the same number of steps:

- (a) ``plain``: the lecture's loop: ``randint`` batch from the full tensors, forward, cross-entropy,
  ``p.grad = None``, backward, ``p.data += -lr * p.grad``.
- (b) ``port``: the obvious Lightning port: ``DataLoader(TensorDataset(X, Y), batch_size=32,
  shuffle=True, drop_last=True)``, ``self.log`` on every step, the default Trainer (progress bar,
  logger, checkpoint).
- (c) ``ours``: ``train.py fit --monitors false``, i.e. ``MakemoreCLI`` with exactly the arguments a
  user types (its Trainer, data module, loaders, schedule, checkpointing and logging).
- (d) ``ours+monitors``: the same with the four monitors of ``callbacks/`` at their default cadence.
- (e) ``ours-public``: (c) with ``--fast_path false``: Lightning's public path only, so c / e is what
  ``lightning_makemore/fastpath.py`` buys (its reason to exist).
- (f) ``ours+spikes``: (d) with ``--spikes true``: the every-step trace for the loss-spike diagnosis.
- (g) ``ours+group``: (d) with the four monitors as one ``CallbackGroup`` in place of ``HealthMonitor`` (what
  ``train.py`` passed before the diagnoses; the like-for-like row when old and new code are compared).

``--loops`` picks some of them (default: a to e). Which code is measured is the ``callbacks`` and
``lightning_makemore`` that Python imports (their paths are printed): with ``PYTHONPATH=/path/to/other/tree`` the
same script measures another checkout, e.g. a ``git worktree`` of an older commit, in the same session.

Each loop is timed from the end of optimizer step ``--warmup`` to the end of the last step (wall and
CPU time; torch's global optimizer-step hook reads the clocks), so imports, first calls, the final
validation, checkpoint and end-of-fit figures are left out. The four run in one process, alternating
within each repeat (so drifts in the machine's load hit all alike); medians over ``--repeats``.
CPU time (``time.process_time``, plus the CPU of the monitors' figure process, ``callbacks._background``) is the
figure to trust when other jobs share the cores; the figure process runs beside training, so wall time is what a
user waits for when a core is free.

    python benchmarks/bench_speed.py --steps 5000 --repeats 5
    python benchmarks/bench_speed.py --long           # also peak RSS of a 200,000-step run with monitors
    python benchmarks/bench_speed.py --loops ours ours+monitors ours+spikes --steps 3000 --output /tmp/s.md
    python benchmarks/bench_speed.py --profile ours+monitors --steps 3000   # CPU seconds inside callbacks/
    python benchmarks/bench_speed.py --loops ours ours+group --by-place     # also steps by their place in a cycle

Targets (issue 4): c >= 0.5 x a, c >= 1.6 x b, d <= 1.10 x c (time), i.e. d/c >= 0.91 in steps/s;
peak RSS of the long run under 1 GB and flat after warm-up. Issue 26: g <= 1.05 x c (time), d >= 0.5 x a and
d >= 1.8 x b. Each ratio's repeats come with a 90 % interval of their median (``median_interval``): a target is
shown met when the whole interval is. Writes ``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import json
import logging
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

import lightning_makemore.cli as cli_module
from lightning_makemore.cli import MakemoreCLI
from lightning_makemore.data import NamesDataModule
from lightning_makemore.model import MLP
from lightning_makemore.module import LECTURE_SEED, MakemoreModule

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.md"
LOOPS = ("plain", "port", "ours", "ours+monitors", "ours-public", "ours+spikes", "ours+group")
LETTERS = dict(zip(LOOPS, "abcdefg", strict=True))
DEFAULT_LOOPS = LOOPS[:5]


# --------------------------------------------------------------------------------------------- timing
def figure_process_cpu() -> float:
    """CPU seconds of the monitors' figure process so far (0 where the measured code has none: an older tree)."""
    try:
        from callbacks._background import figure_process_cpu as cpu
    except ImportError:
        return 0.0
    return cpu()


class Clock:
    """Wall and CPU seconds between the end of step `warmup` and the end of the last step; a profiler, if given,
    runs over the same steps (up to step `last`)."""

    #: a list while `--by-place` records every timed step's end (perf_counter) of the fit that runs; None: not kept
    marks: list[float] | None = None

    def __init__(self, warmup: int, last: int = 0, profiler: cProfile.Profile | None = None) -> None:
        self.warmup = warmup
        self.last = last
        self.profiler = profiler
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] = (0.0, 0.0)
        self.steps = 0

    def tick(self, step: int) -> None:
        """Call after optimizer step `step` (1-based) has finished. The clocks are read at the window's two ends
        only (reading the CPU clock costs microseconds, 2-3 % of the lecture's step, in every loop)."""
        if Clock.marks is not None and step >= self.warmup:
            Clock.marks.append(time.perf_counter())
        if step != self.warmup and step != self.last:
            return
        # the figure process's CPU counts too
        now = (time.perf_counter(), time.process_time() + figure_process_cpu())
        if step == self.warmup:
            self.start = now
            if self.profiler is not None:
                self.profiler.enable()
        elif step == self.last and self.profiler is not None:
            self.profiler.disable()
        self.end, self.steps = now, step - self.warmup

    def result(self) -> tuple[float, float, int]:
        if self.start is None or self.steps == 0:
            raise RuntimeError(f"Expected {self.last} steps, more than the {self.warmup} of warm-up, to time.")
        return self.end[0] - self.start[0], self.end[1] - self.start[1], self.steps


@contextlib.contextmanager
def optimizer_clock(clock: Clock) -> Iterator[None]:
    """Reads the clocks after every optimizer step, via torch's global optimizer hook.

    Not a Lightning callback: one more callback would itself cost every step (Lightning calls each hook of
    each callback), and that cost belongs to the benchmark, not to the loop being measured. In a steady
    state each interval between two ticks holds exactly one whole step, hooks and callbacks included.
    """
    count = 0

    def tick(*_: Any) -> None:
        nonlocal count
        count += 1
        clock.tick(count)

    handle = register_optimizer_step_post_hook(tick)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def quiet():
    """Progress bars, summaries and sampled names go to /dev/null (tqdm still formats and writes them)."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def lecture_net(vocab_size: int) -> MLP:
    return MLP(vocab_size, block_size=3, n_embd=10, n_hidden=200, generator=torch.Generator().manual_seed(LECTURE_SEED))


# ---------------------------------------------------------------------------------------------- loops
def run_plain(data: tuple[Tensor, Tensor, int], steps: int, warmup: int, root: str) -> tuple[float, float, int]:
    """(a) the lecture's loop, with the lecture's lr drop at half the steps."""
    X, Y, vocab_size = data
    net = lecture_net(vocab_size)
    params = list(net.parameters())
    g = torch.Generator().manual_seed(LECTURE_SEED)
    clock = Clock(warmup, steps)
    for i in range(steps):
        ix = torch.randint(0, X.shape[0], (32,), generator=g)
        Xb, Yb = X[ix], Y[ix]  # (32, 3), (32,)
        loss = F.cross_entropy(net(Xb), Yb)
        for p in params:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < steps // 2 else 0.01
        for p in params:
            p.data += -lr * p.grad
        clock.tick(i + 1)
    return clock.result()


class PortModule(L.LightningModule):
    """(b) what a first Lightning port of the lecture looks like."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.net = lecture_net(vocab_size)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10**9], gamma=0.1)
        return [optimizer], [scheduler]


def run_port(data: tuple[Tensor, Tensor, int], steps: int, warmup: int, root: str) -> tuple[float, float, int]:
    X, Y, vocab_size = data
    loader = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True, drop_last=True)
    clock = Clock(warmup, steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=root)
    with quiet(), optimizer_clock(clock):
        trainer.fit(PortModule(vocab_size), loader)
    return clock.result()


#: the arguments of `run_ours` for each of its loops
OURS: dict[str, dict[str, Any]] = {
    "ours": {"monitors": False},
    "ours+monitors": {"monitors": True},
    "ours-public": {"monitors": False, "extra": ["--fast_path", "false"]},
    "ours+spikes": {"monitors": True, "extra": ["--spikes", "true"]},
    "ours+group": {"monitors": True, "group": True},
}


def run_ours(
    steps: int,
    warmup: int,
    root: str,
    monitors: bool,
    extra: list[str] = (),
    group: bool = False,
    profiler: cProfile.Profile | None = None,
) -> tuple[float, float, int]:
    """(c), (d), (e), (f), (g): `python train.py fit ...` in this process, timed by the optimizer clock.

    ``group``: the CLI's monitors are the four monitors as one ``CallbackGroup`` (the same place in the callback
    list as its own monitors), whatever this checkout's ``train.py`` uses by default. ``profiler``: enabled over
    the timed steps only.
    """
    clock = Clock(warmup, steps, profiler)
    args = ["fit", "--trainer.max_steps", str(steps), "--monitors", str(monitors).lower()]
    args += ["--trainer.default_root_dir", root, *extra]
    with quiet(), optimizer_clock(clock), _four_as_group(group):
        MakemoreCLI(
            MakemoreModule,
            NamesDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    return clock.result()


@contextlib.contextmanager
def _four_as_group(active: bool) -> Iterator[None]:
    """While active, the CLI's monitors are `CallbackGroup([the four monitors])` (train.py's before issue 18)."""
    if not active:
        yield
        return
    from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

    def four(*args: Any, **kwargs: Any) -> list[Callback]:
        return [CallbackGroup([ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()])]

    original = cli_module.make_monitors
    cli_module.make_monitors = four
    try:
        yield
    finally:
        cli_module.make_monitors = original


# ------------------------------------------------------------------------------------------- long run
def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class RSSCallback(Callback):
    def __init__(self, total: int, points: int = 10) -> None:
        self.at = {total * k // points for k in range(1, points + 1)} | {1000}
        self.samples: list[tuple[int, float, float, float]] = []
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.at:
            self.samples.append((trainer.global_step, time.perf_counter() - self.t0, *rss_mb()))


def long_child(steps: int) -> None:
    """Child process of --long: train.py fit with monitors for `steps`, RSS sampled along the way."""
    torch.set_num_threads(1)
    callback = RSSCallback(steps)
    with tempfile.TemporaryDirectory() as root, quiet():
        args = ["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", root]
        MakemoreCLI(
            MakemoreModule,
            NamesDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [callback]},
        )
    print(json.dumps({"samples": callback.samples, "final": rss_mb()}))


def run_long(steps: int) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--long-child", str(steps)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"long run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


# -------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}, {torch.get_num_threads()} intra-op thread"
    )


def busy_processes() -> int:
    """Other processes using a CPU now (a rough load figure for the report)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu"], capture_output=True, text=True).stdout.splitlines()[1:]
    return sum(1 for line in out if float(line.split()[1]) > 20 and int(line.split()[0]) != os.getpid())


def table(times: dict[str, dict[str, list[float]]], steps: int) -> list[str]:
    rows = ["| loop | steps/s (wall) | steps/s (CPU) | ms/step (CPU) | runs (wall s) |", "|---|---:|---:|---:|---|"]
    for loop in LOOPS:
        if loop not in times:
            continue
        wall, cpu = statistics.median(times[loop]["wall"]), statistics.median(times[loop]["cpu"])
        runs = ", ".join(f"{t:.2f}" for t in times[loop]["wall"])
        name = f"({LETTERS[loop]}) {loop}"
        rows.append(f"| {name} | {steps / wall:,.0f} | {steps / cpu:,.0f} | {1e3 * cpu / steps:.3f} | {runs} |")
    return rows


def median_interval(values: list[float], level: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval of the median of ``values`` (each repeat's ratio): the order statistics
    ``x(k) .. x(n + 1 - k)``, ``k`` the largest with ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``, which holds the
    true median with probability ``level`` at least, whatever the noise's distribution. Five repeats give their
    range (93.8 %); twenty give the 6th to the 15th smallest (95.9 %)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    tail = (1 - level) / 2
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    ordered = sorted(values)
    k = max(k, 1)  # (fewer than five repeats: the range, with less than `level`)
    return ordered[k - 1], ordered[n - k]


def ratios(times: dict[str, dict[str, list[float]]]) -> list[str]:
    """The ratios of steps/s among the loops that ran: of the medians, and each repeat's, as their median, range and
    the 90 % interval of their median (:func:`median_interval`): a target is shown met when all of it is."""
    rate = {kind: {loop: 1 / statistics.median(x[kind]) for loop, x in times.items()} for kind in ("wall", "cpu")}
    checks = [
        ("c / a", "ours", "plain", ">= 0.5"),
        ("c / b", "ours", "port", ">= 1.6"),
        ("d / c", "ours+monitors", "ours", ">= 0.91 (time <= 1.10 x)"),
        ("c / e", "ours", "ours-public", "> 1 (the fast path's gain)"),
        ("g / c", "ours+group", "ours", ">= 0.952 (time <= 1.05 x): the four monitors alone (d before issue 18)"),
        ("d / g", "ours+monitors", "ours+group", "what HealthMonitor adds to the four"),
        ("f / c", "ours+spikes", "ours", "--spikes true"),
        ("f / d", "ours+spikes", "ours+monitors", "what the every-step trace costs"),
    ]
    rows = [
        "| ratio of steps/s | wall | CPU | wall, each repeat: median (range) | 90 % interval of that median | target |",
        "|---|---:|---:|---|---|---|",
    ]
    for name, num, den, target in checks:
        if num not in times or den not in times:
            continue
        wall, cpu = rate["wall"][num] / rate["wall"][den], rate["cpu"][num] / rate["cpu"][den]
        # the two loops' fits of the same repeat, side by side: the ratio's own spread, drift left out
        each = [d / n for n, d in zip(times[num]["wall"], times[den]["wall"], strict=True)]
        spread = f"{statistics.median(each):.3f} ({min(each):.2f}-{max(each):.2f})"
        lo, hi = median_interval(each)
        rows.append(f"| {name} | {wall:.3f} | {cpu:.2f} | {spread} | {lo:.3f}-{hi:.3f} | {target} |")
    return rows


def by_place(marks: dict[str, list[list[float]]], warmup: int, cycle: int) -> list[str]:
    """`--by-place`: each loop's steps by their place in a cycle of ``cycle`` steps (the monitors' cadence repeats
    every 500 steps: nine scalar steps and a histogram step), pooled over its fits. The median step of each place,
    summed over the cycle, is the time of a typical cycle: a step slowed by something else on the machine is left
    out, the monitors' recorded steps (a place of their own) are not. The means of the places are the wall time's
    twin. ``marks``: each fit's step ends, from step ``warmup`` on."""
    cycles: dict[str, tuple[float, float]] = {}
    for loop, fits in marks.items():
        places: list[list[float]] = [[] for _ in range(cycle)]
        for m in fits:  # interval j ends with the optimizer step of global step `warmup + j` (0-based)
            for j in range(len(m) - 1):
                places[(warmup + j) % cycle].append(m[j + 1] - m[j])
        seen = [p for p in places if p]
        cycles[loop] = (sum(map(statistics.median, seen)), sum(map(statistics.fmean, seen)))
    rows = [
        f"Steps by their place in a cycle of {cycle} (`--by-place`): ms a step of a typical cycle (each place's"
        " median) and of the mean one, and the time ratios to (c):",
        "",
        "| loop | ms a step, medians | ms a step, means | time / (c)'s, medians | time / (c)'s, means |",
        "|---|---:|---:|---:|---:|",
    ]
    ref = cycles.get("ours")
    for loop in LOOPS:
        if loop not in cycles:
            continue
        med, mean = cycles[loop]
        vs = f"{med / ref[0]:.3f} | {mean / ref[1]:.3f}" if ref else " | "
        rows.append(f"| ({LETTERS[loop]}) {loop} | {1e3 * med / cycle:.3f} | {1e3 * mean / cycle:.3f} | {vs} |")
    return rows


def _run_loop(loop: str, warmup: int, steps: int, root: str) -> tuple[float, float, int]:
    return run_ours(steps, warmup, root, **OURS[loop])


def profile(args: argparse.Namespace) -> None:
    """`--profile LOOP`: one fit of the loop under cProfile (CPU-time clock) over its timed steps, after a warm-up
    fit; the CPU seconds spent inside `callbacks/` then, and the top lines."""
    from bench_monitors import seconds_in_callbacks

    with tempfile.TemporaryDirectory() as root:
        _run_loop(args.profile, args.warmup, args.warmup + 300, root)  # imports, matplotlib, first figure
        profiler = cProfile.Profile(time.process_time)  # CPU time: others share the machine
        wall, cpu, n = run_ours(args.steps, args.warmup, root, profiler=profiler, **OURS[args.profile])
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    inside = seconds_in_callbacks(stats)
    stats.sort_stats("cumulative").print_stats(r"callbacks/", 30)
    print(text.getvalue())
    print(
        f"{args.profile}: {cpu:.2f} s CPU / {wall:.2f} s wall for {n} steps, profiled; inside callbacks/ (entered from"
        f" outside it): {inside:.3f} s CPU ({1e3 * inside / n:.3f} ms a step); code: {code_paths()}"
    )
    if args.json:
        record = {"code": code_paths(), "profile": args.profile, "inside": inside, "cpu": cpu, "wall": wall}
        args.json.write_text(json.dumps(record))


def code_paths() -> str:
    """Where the measured code was imported from (another checkout with PYTHONPATH)."""
    import callbacks
    import lightning_makemore

    return ", ".join(str(Path(m.__file__).parent) for m in (callbacks, lightning_makemore))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="also a 200,000-step run with monitors for RSS")
    parser.add_argument("--long-steps", type=int, default=200_000)
    parser.add_argument("--long-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(DEFAULT_LOOPS), help="default: a to e")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, help="also write every repeat's seconds here (for comparisons)")
    parser.add_argument("--profile", choices=OURS, help="one fit of this loop under cProfile: CPU inside callbacks/")
    parser.add_argument(
        "--by-place",
        type=int,
        nargs="?",
        const=500,
        default=0,
        metavar="CYCLE",
        help="also time every step and give each loop's steps by their place in a cycle of CYCLE steps (500)",
    )
    args = parser.parse_args()
    if args.by_place < 0:
        parser.error(f"--by-place takes a cycle of at least 1 step (500: the monitors' cadence), not {args.by_place}")
    if not os.environ.get("MAKEMORE_NAMES") and not args.long_child:
        print("note: MAKEMORE_NAMES is not set; the names corpus is read from the download cache", file=sys.stderr)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if args.long_child:
        long_child(args.long_child)
        return
    torch.set_num_threads(1)
    if args.profile:
        profile(args)
        return

    dm = NamesDataModule()
    dm.setup("fit")
    data = (*dm.splits["train"], len(dm.vocab))
    runners = {
        "plain": lambda n, root: run_plain(data, n, args.warmup, root),
        "port": lambda n, root: run_port(data, n, args.warmup, root),
        **{loop: functools.partial(_run_loop, loop, args.warmup) for loop in OURS},
    }
    loops = [loop for loop in LOOPS if loop in args.loops]
    times: dict[str, dict[str, list[float]]] = {loop: {"wall": [], "cpu": []} for loop in loops}
    marks: dict[str, list[list[float]]] = {loop: [] for loop in loops}  # (--by-place)
    busy = [busy_processes()]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as root:
        for loop in loops:  # warm-up of each: imports, matplotlib, first figure
            runners[loop](args.warmup + 300, root)
        for r in range(args.repeats):
            order = loops if r % 2 == 0 else loops[::-1]  # alternate, so drifts in load hit all alike
            for loop in order:
                gc.collect()
                Clock.marks = [] if args.by_place else None
                wall, cpu, n = runners[loop](args.steps, root)
                if Clock.marks is not None:
                    marks[loop].append(Clock.marks)
                    Clock.marks = None
                times[loop]["wall"].append(wall)
                times[loop]["cpu"].append(cpu)
                print(
                    f"repeat {r + 1}/{args.repeats} {loop:>14}: {n / wall:7,.0f} steps/s wall, {n / cpu:7,.0f} CPU",
                    flush=True,
                )
            busy.append(busy_processes())
            load.append(os.getloadavg()[0])
    timed = args.steps - args.warmup
    command = "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:])
    lines = [
        f"Machine: {machine()}.",
        f"Command: `{command.strip()}`. Steps {args.steps} per fit, {timed} timed (after {args.warmup} of warm-up),"
        f" median of {args.repeats} alternating repeats. Other busy processes during the run: {min(busy)}-{max(busy)}"
        f" (load average {min(load):.1f}-{max(load):.1f}).",
        f"Code measured: {code_paths()}.",
        "",
        *table(times, timed),
        "",
        *ratios(times),
        *(["", *by_place(marks, args.warmup, args.by_place)] if args.by_place else []),
    ]
    if args.long:
        print(f"long run: {args.long_steps} steps with monitors ...", flush=True)
        long = run_long(args.long_steps)
        lines += [
            "",
            f"Long run: `train.py fit --trainer.max_steps {args.long_steps}` with the four monitors, "
            f"{long['wall']:.0f} s in all (process start, validation and checkpoint included).",
            "",
            "| step | % of run | RSS (MB) | peak RSS so far (MB) |",
            "|---:|---:|---:|---:|",
        ]
        for step, _, rss, peak in long["samples"]:
            lines.append(f"| {step:,} | {100 * step / args.long_steps:.0f} % | {rss:.0f} | {peak:.0f} |")
        lines.append(f"| end of fit | | {long['final'][0]:.0f} | {long['final'][1]:.0f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.json:
        record = {"code": code_paths(), "timed": timed, "busy": busy, "load": load, "times": times}
        if args.by_place:
            record["marks"] = marks
        args.json.write_text(json.dumps(record, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    history = _history(args.output)
    args.output.write_text(
        "# Training speed: plain PyTorch, the obvious Lightning port, ours\n\n"
        "Written by `benchmarks/bench_speed.py` (see its docstring for what each loop is).\n\n"
        + text
        + "\n\n"
        + TRICKS
        + history
    )


def _history(path: Path) -> str:
    """The dated sections that follow the trick table in an existing results file: a run rewrites the table above
    them and keeps them."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find(TRICKS.splitlines()[0])
    after = text.find("\n## ", start + 1) if start >= 0 else -1
    return text[after:] if after >= 0 else ""


#: the per-trick figures that used to sit in code comments (profiled on the 2-core AMD EPYC of the table above,
#: Lightning 2.6, one thread, the lecture's model at ~0.7 ms a step); c / e above measures them together
TRICKS = """## What each trick skips (profiled once; c / e above is the current total)

| where | trick | cost skipped, per training step |
|---|---|---|
| fastpath.py | `_current_fx_name` stored without `nn.Module.__setattr__` (set ~46 times a step) | ~7 % of the step |
| fastpath.py | module step hooks left empty shadowed by None (~12 hooks, each in a profiler context) | ~4 us a hook |
| fastpath.py | identity batch hooks answered at once (two `is_overridden` a hook a batch) | a few us |
| fastpath.py | `training_step.__signature__` cached (`inspect.getfullargspec` every step) | ~10 us |
| fastpath.py | idle step hooks of the CLI's callbacks shadowed (a called hook formats `state_key`) | ~40 us each |
| fastpath.py | `ModelCheckpoint.on_train_batch_end` shadowed when it saves after validation only | ~15 us |
| cli.py | progress bar refreshed every 50 steps, not every step | ~15 % of the step |
| cli.py | the four monitors grouped into one callback (`CallbackGroup`) | ~15 % of the step |
| module.py | `self.log("train/loss")` only on the steps Lightning writes | about one step's worth |
| data.py | `transfer_batch_to_device` returns batches already on the device | ~20 us |
| data.py | a chunk's batches as views made at once (`unbind`), not indexed one by one | ~5 us |
| fastpath.py | `FastPath`'s own six step hooks shadowed (it acts at the start and end only) | ~3 us each |
| fastpath.py | the logger connector's metric refresh only after a `log` call (it `.item()`s the bar's loss) | ~30 us |
| fastpath.py | `_should_accumulate` answered at once while `accumulate_grad_batches` is 1 (asked ~6 times) | ~5 us |
| fastpath.py | a logged metric's state not walked and deep-copied when on the value's device (2 logs a 50) | ~11 us |
| module.py | `optimizer_zero_grad` is the lecture's `p.grad = None` (no profiler range, no dynamo guard) | ~30 us |
| cli.py | the TensorBoard logger waits for its writer thread at most once a second (every 50 steps before) | ~10 us |

Measured before the redesign of issue 13: removing the module tricks cost ~17 % of `train.py`'s throughput,
removing the callback-hook skipping too ~22 %.
"""


if __name__ == "__main__":
    main()
