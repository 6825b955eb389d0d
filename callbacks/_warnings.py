"""How the monitors warn: a ``HealthWarning`` through Python's ``warnings``, shown as one line above the progress bar.

``rank_zero_warn`` from a file outside Lightning prints the warning's source line under it (Lightning's
``formatwarning`` drops that echo only for its own files), and plain ``warnings.warn`` writes to stderr in
the middle of the progress bar's line. Here, when nobody else handles warnings, the warning goes through the
filters exactly as ``warnings.warn`` would (``"ignore"``, ``"error"`` and ``-W`` work) and is then written with
``tqdm.write``, which clears the bars, prints the line and redraws them. When warnings are recorded or shown
some other way (``pytest``, ``warnings.catch_warnings(record=True)``, a custom ``showwarning``), they get it as
an ordinary warning.
"""

import sys
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["HealthWarning", "health_warning"]

_SHOW = warnings.showwarning
_SHOW_IMPL = getattr(warnings, "_showwarnmsg_impl", None)


class HealthWarning(UserWarning):
    """A training-health warning of the monitors, e.g. ``warnings.filterwarnings("ignore", category=HealthWarning)``."""


def health_warning(message: str) -> None:
    """Warns ``message`` as a :class:`HealthWarning` on rank zero, as one line that leaves the progress bar intact."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    if warnings.showwarning is not _SHOW or getattr(warnings, "_showwarnmsg_impl", None) is not _SHOW_IMPL:
        warnings.warn(message, HealthWarning, stacklevel=3)  # recorded or shown by someone else's handler
        return
    with warnings.catch_warnings(record=True) as caught:  # the user's filters still apply
        warnings.warn(message, HealthWarning, stacklevel=3)
    from tqdm import tqdm

    for w in caught:
        tqdm.write(f"{w.category.__name__}: {w.message}", file=sys.stderr)
