"""The training progress bar: optimizer steps of `max_steps`, one bar, in a terminal and in a notebook.

`StepProgressBar` counts steps, not epochs without an end ("Training 1200/200000"), and its rate and time left are
the steps of this run over the time since it started. In a terminal it is Lightning's tqdm bar. In a Jupyter or
Colab notebook it is one output that is updated in place (IPython's ``display(..., display_id=True)``): an HTML
``<progress>`` bar with tqdm's text beside it, and the same text as plain text. Validation and the sanity check
get no bar of their own there (a terminal's nested bars move the cursor, which a notebook cannot: each update
would be a new line), and the output is redrawn at most every ``min_interval`` seconds, so a fit of 200,000 steps
sends a few hundred updates, not one per step. The output is a display, not a stream, so a saved notebook keeps
the bar's last state (the docs site and GitHub show it as it ended), and it needs no ipywidgets.
"""

from __future__ import annotations

import html
import inspect
import io
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.std import tqdm as std_tqdm
from typing_extensions import override

#: the width of the plain-text line a notebook shows (tqdm measures no terminal there)
NOTEBOOK_COLUMNS = 100
#: the text beside the HTML bar: tqdm's line without its bar
TEXT_FORMAT = "{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
TEXT_FORMAT_NO_TOTAL = "{desc} {n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (Jupyter, JupyterLab, Colab, VS Code), not a terminal or a script.

    IPython is not imported for the question: a process that has not imported it is not a kernel.
    """
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class BarView:
    """One state of a notebook bar as IPython displays it: HTML (a ``<progress>`` element and the text) and plain
    text (tqdm's line), for front ends that show only one of them.

    Args:
        n: steps done.
        total: steps in all (None: unknown, no bar drawn).
        text: tqdm's line without its bar, e.g. ``"Training 120/200 [00:03<00:02, 40.00it/s]"``.
        line: tqdm's whole line, bar included (the plain-text form).
    """

    def __init__(self, n: int, total: int | None, text: str, line: str) -> None:
        self.n, self.total, self.text, self.line = n, total, text, line

    def _repr_html_(self) -> str:
        bar = f'<progress value="{self.n}" max="{self.total}" style="width:24ch"></progress> ' if self.total else ""
        # no `white-space:pre`: the line wraps where the output is narrower than it (a docs page, a phone), not
        # clipped at the output's edge
        return f'<div style="font-family:monospace">{bar}{html.escape(self.text)}</div>'

    def __repr__(self) -> str:
        return self.line


class NotebookTqdm(std_tqdm):
    """A tqdm bar drawn as one IPython display output, updated in place and at most every ``min_interval`` s.

    It keeps tqdm's arithmetic (the counts, the rate, the time left, the postfix); only where the line goes
    changes. Nothing is written to a stream. The first state, the state after a ``reset``, the first at 100 %
    and the last one (at close) are always drawn; any other waits until ``min_interval`` has passed.

    Args:
        *args: tqdm's.
        min_interval: seconds between two redraws (the forced ones above excepted).
        **kwargs: tqdm's (``file`` and ``position`` are ignored: there is no stream, and one bar).
    """

    format_num = staticmethod(Tqdm.format_num)  # Lightning's padding: the numbers of the postfix do not jitter

    def __init__(self, *args: Any, min_interval: float = 0.5, **kwargs: Any) -> None:
        kwargs.pop("position", None)
        kwargs["file"] = io.StringIO()  # tqdm's own writes (a final newline) go nowhere
        self.min_interval = min_interval
        self._handle: Any = None
        self._shown_at = -float("inf")
        self._force = True  # the next refresh draws whatever the time: the first, after a reset, at close
        self._done_shown = False
        super().__init__(*args, **kwargs)

    def view(self) -> BarView:
        """The bar's current state as IPython displays it."""
        d = self.format_dict
        total = d["total"]
        line = self.format_meter(**{**d, "ncols": NOTEBOOK_COLUMNS})
        # `set_description` ends the name with ": " (tqdm's "Training: 100%|"): beside the HTML bar, no colon
        desc = (d.get("prefix") or "").rstrip().rstrip(":")
        fmt = TEXT_FORMAT if total else TEXT_FORMAT_NO_TOTAL
        text = self.format_meter(**{**d, "prefix": desc, "ncols": None, "bar_format": fmt})
        return BarView(int(self.n), int(total) if total else None, text.strip(), line)

    @override
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Draws the current state (tqdm calls it on each refresh); ``msg=""`` (tqdm's "clear") leaves it as is."""
        if msg == "":
            return True
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if not (self._force or (done and not self._done_shown)) and now - self._shown_at < self.min_interval:
            return True  # too soon: a later refresh, 100 % or the close draws it
        self._shown_at, self._force, self._done_shown = now, False, done
        from IPython.display import display

        view = self.view()
        if self._handle is None:
            self._handle = display(view, display_id=True)
        else:
            self._handle.update(view)
        return True

    @override
    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: the output is replaced in place, never written over."""

    @override
    def reset(self, total: float | None = None) -> None:
        """Starts over (tqdm's), and the next refresh draws at once: a new total is news, not a redraw to skip."""
        super().reset(total=total)
        self._force = True

    @override
    def close(self) -> None:
        """Draws the last state (tqdm's close redraws a bar it leaves) and closes the bar."""
        self._force = True
        super().close()


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps of `max_steps` ("Training 1200/200000"), not epochs without an end.

    One bar for the whole fit: it starts when training starts (or resumes) and is never reset at an epoch's end,
    so its rate and time left are the steps since then over the time since then (validation included). It is
    closed with the last epoch, before Lightning says why the fit stopped, so that line stands on its own.
    Without `max_steps` (a fit of `max_epochs`) it is Lightning's bar, one per epoch.

    In a notebook (see :func:`in_notebook`) the bars are :class:`NotebookTqdm`: one output updated in place, and
    no separate bar for validation or the sanity check during fit (the training bar's postfix shows ``val/loss``
    when validation ends).

    Args:
        refresh_rate: steps between two updates of the bar (Lightning's default, 1, costs time on every step).
        process_position: Lightning's, for several bars in one terminal.
        leave: Lightning's: keep each epoch's bar (only without `max_steps`).
        notebook: draw notebook bars; default: whether this process is a Jupyter kernel.
        min_interval: in a notebook, seconds between two redraws.

    Raises:
        ValueError: when ``min_interval`` is negative or ``notebook`` is not a bool or None.

    Example::

        import lightning as L
        from lightning_makemore.progress import StepProgressBar

        trainer = L.Trainer(max_steps=2_000, callbacks=[StepProgressBar()])
    """

    def __init__(
        self,
        refresh_rate: int = 50,
        process_position: int = 0,
        leave: bool = False,
        notebook: bool | None = None,
        min_interval: float = 0.5,
    ) -> None:
        if notebook is not None and not isinstance(notebook, bool):
            raise ValueError(f"Expected `notebook` to be a bool or None (detect), but got {notebook!r}.")
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ValueError(f"Expected `min_interval` to be a number of seconds >= 0, but got {min_interval!r}.")
        # `leave` came with Lightning 2.3; on older releases an epoch's bar is never kept, whatever is asked
        extra = {"leave": leave} if "leave" in inspect.signature(TQDMProgressBar.__init__).parameters else {}
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, **extra)
        self.notebook = in_notebook() if notebook is None else notebook
        self.min_interval = float(min_interval)

    def _notebook_bar(self, desc: str, leave: bool = True) -> NotebookTqdm:
        return NotebookTqdm(
            desc=desc,
            disable=self.is_disabled,
            leave=leave,
            smoothing=0,  # the rate is the steps over the time since the start, not a moving average
            bar_format=self.BAR_FORMAT,
            min_interval=self.min_interval,
        )

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @override
    def init_train_tqdm(self) -> Tqdm:
        if self.notebook:
            return self._notebook_bar(self.train_description)  # type: ignore[return-value]
        return super().init_train_tqdm()

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        if self.notebook:
            return Tqdm(disable=True)
        return super().init_sanity_tqdm()

    @override
    def init_validation_tqdm(self) -> Tqdm:
        if self.notebook:
            # during fit the training bar stays the only one; `trainer.validate()` gets a bar of its own
            return Tqdm(disable=True) if self._fitting() else self._notebook_bar(self.validation_description)  # type: ignore[return-value]
        return super().init_validation_tqdm()

    @override
    def init_test_tqdm(self) -> Tqdm:
        if self.notebook:
            return self._notebook_bar("Testing")  # type: ignore[return-value]
        return super().init_test_tqdm()

    @override
    def init_predict_tqdm(self) -> Tqdm:
        if self.notebook:
            return self._notebook_bar(self.predict_description)  # type: ignore[return-value]
        return super().init_predict_tqdm()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.max_steps <= 0:
            return
        bar = self.train_progress_bar
        bar.set_description("Training", refresh=False)
        bar.reset(total=trainer.max_steps)  # starts the bar's clock
        # a resumed fit counts from its checkpoint's step: the rate is over the steps of this run only
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        bar.refresh()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        step = trainer.global_step
        if step % self.refresh_rate == 0 or step >= trainer.max_steps:
            bar = self.train_progress_bar
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # the postfix gains the epoch's val/loss
        last_step = 0 < trainer.max_steps <= trainer.global_step
        # `current_epoch` counts completed epochs: this one is not counted yet
        last_epoch = (trainer.max_epochs or -1) > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
        if last_step or last_epoch:
            # ends the bar's line now: Lightning's "`Trainer.fit` stopped: ..." comes next, on a line of its own
            # (closing again in `on_train_end` prints nothing)
            self.train_progress_bar.close()
