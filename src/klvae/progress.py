"""Progress bars that follow the `klvae` logger, so that quieting the logs (`klvae -q`) hides the bars too."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

from klvae.errors import printable

T = TypeVar("T")


def progress_bar(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar, hidden when the "klvae" logger's own level is set above INFO (as `klvae -q` sets it).

    A library user who never configures logging keeps the bars, as with diffusers.
    """
    level = logging.getLogger("klvae").level
    quiet = level != logging.NOTSET and level > logging.INFO
    return tqdm(iterable, disable=disable or quiet, **kwargs)


class BarAwareHandler(logging.StreamHandler):
    """A stream handler that writes through tqdm.write: the open bars are cleared, the line printed, then redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record above any progress bar on the same stream."""
        try:
            # The message on one line with a file name's control characters escaped (printable); a copy, so that
            # other handlers get the record as logged.
            shown = logging.makeLogRecord({**record.__dict__, "msg": printable(record.getMessage()), "args": None})
            tqdm.write(self.format(shown), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
