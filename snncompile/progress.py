"""Progress bars for the long loops a user starts (tqdm), shown only where someone can see them.

Every loop that can run for a long time -- calibration in ``ann2snn.convert``, chunked and
streamed long-``T`` inference (``runtime.chunked_forward`` / ``stream``, ``ann2snn.simulate``),
the online-learning loops over time steps (``functional.fptt_online_training`` /
``ottt_online_training``) and ``snncompile bench`` -- takes ``progress: bool = True``.

* ``progress=False`` turns the bar off;
* ``progress=True`` shows it only when the output is a terminal (tqdm's ``disable=None``), so
  logs, pipes, CI and test runs stay clean;
* loops that also run inside an ordinary forward call (a chunked compiled module, one online
  training step per batch) pass a ``delay``: the bar appears only once the loop has run that
  many seconds, so short calls never draw one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | float | None = None,
    unit: str = "it",
    progress: bool = True,
    delay: float = 0.0,
    leave: bool = False,
) -> Any:
    """Return a ``tqdm`` bar over ``iterable`` (or a manual one when ``iterable`` is ``None``).

    Args:
        iterable: What to iterate over; ``None`` for a bar advanced with ``bar.update(n)``.
        desc: The label shown before the bar.
        total: The expected number of items (or units), if known.
        unit: The unit name (``'step'``, ``'batch'``, ...).
        progress: ``False`` disables the bar; ``True`` shows it when stderr is a terminal.
        delay: Seconds to wait before the bar is first drawn.
        leave: Keep the finished bar on the screen.
    """
    from tqdm import tqdm

    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=None if progress else True,
        delay=delay,
        leave=leave,
        dynamic_ncols=True,
    )
