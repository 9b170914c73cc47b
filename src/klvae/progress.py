"""Progress bars that follow the `klvae` logger, so that quieting the logs (`klvae -q`) hides the bars too."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

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
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
