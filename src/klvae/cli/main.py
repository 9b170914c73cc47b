"""Entry point of the `klvae` command: parse, dispatch, and turn failures into one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from klvae import __version__
from klvae.errors import KlvaeError, printable, raised_within
from klvae.progress import BarAwareHandler

log = logging.getLogger("klvae")

# Each module adds its subcommands with `register(subparsers)`; kept as names so `klvae --help` stays fast.
COMMAND_MODULES = (
    "klvae.cli.codec",
    "klvae.cli.train",
    "klvae.cli.latents",
    "klvae.cli.noise",
    "klvae.cli.evaluate",
    "klvae.cli.convert",
)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that names each option's default, where there is one worth naming and the text does not already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or d is None or isinstance(d, bool) or d == [] or d is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        """One line, as klvae's other errors are; the usage block is one `--help` away."""
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """argparse's parse_args, with arguments no option takes blamed on the subcommand they were given to."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            # argparse reports them from the top parser ("klvae: error: ... see 'klvae --help'"), whose help does
            # not list the subcommand's options.
            chosen = _subcommand_parser(self, getattr(parsed, "command", None))
            hint = ""
            if any("=" not in o for o in getattr(parsed, "overrides", None) or []):  # `--set train.max_steps 10`
                hint = "; --set takes SECTION.FIELD=VALUE as one word, e.g. --set train.max_steps=10"
            chosen.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        return parsed


def _subcommand_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `command`, or `parser` itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    import importlib

    parser = _Parser(prog="klvae", description="The KL autoencoder of latent diffusion.")
    parser.add_argument("--version", action="version", version=f"klvae {__version__}")
    _add_global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        # Also after the command (`klvae encode ... -q`), as users type them; SUPPRESS leaves the value given
        # before the command (or False) in place when the flag is not repeated after it.
        _add_global_options(command, default=argparse.SUPPRESS)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings and errors only")
    group.add_argument("--debug", action="store_true", default=default,
                       help="show the traceback of unexpected errors")


def setup_logging(level: int) -> None:
    """Log klvae's messages to the current stderr; other handlers (e.g. pytest's) keep theirs."""
    logger = logging.getLogger("klvae")
    for h in [h for h in logger.handlers if getattr(h, "klvae_cli", False)]:
        logger.removeHandler(h)
    # Through tqdm, so that a message lands on a line of its own above a progress bar, not glued to its end.
    handler = BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.klvae_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 partial failure or internal error, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)  # imports torch: seconds in which a Ctrl-C may land
    except KeyboardInterrupt:
        return _interrupted()
    _tolerant_streams()
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    with _terminate_as_interrupt():
        return _run(args)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's timeout, torchrun stopping its workers), raised as Ctrl-C is."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    # By default SIGTERM ends the process on the spot: no temporary file removed, no half-made output folder taken
    # back. Raised as an interrupt, it unwinds through the same clean-up as Ctrl-C.
    def raise_terminated(signum: int, frame: object) -> None:
        raise _Terminated

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """Run the command, each kind of failure as one line and its exit status."""
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe can still be caught, not at the interpreter's exit
        return status
    except BrokenPipeError:
        return _reader_gone()
    except KlvaeError as e:
        print(f"klvae: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped_by(e)
    except OSError as e:
        if (buried := raised_within(e, KeyboardInterrupt)) is not None:
            return _stopped_by(buried)
        print(f"klvae: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # memory running out, or a bug of ours: still one line unless --debug asks for more
        if (buried := raised_within(e, KeyboardInterrupt)) is not None:
            return _stopped_by(buried)
        if args.debug:
            raise
        print(_unexpected(e), file=sys.stderr)
        return 1


def _unexpected(e: Exception) -> str:
    """The one line of an error klvae did not raise itself: memory, a failed torchrun peer, or a bug of ours."""
    if _out_of_memory(e):
        return f"klvae: error: out of memory ({_one_line(e)}); {_MEMORY_ADVICE}"
    if _peer_gone(e):  # a torchrun job's other process failed (its own error line says why): no bug of this one
        return (f"klvae: error: another process of this torchrun job stopped, so this one cannot go on (its error "
                f"says why): {_one_line(e)}")
    return f"klvae: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for details)"


def _tolerant_streams() -> None:
    # Linux file names are bytes, and an undecodable one reaches Python as lone surrogates, which a strict UTF-8
    # stdout (that of most UTF-8 locales) refuses: a command would fail on its last line, its work done.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


_MEMORY_ADVICE = ("tile large images with --tile-size 512 or --max-memory 2GiB, or lower --batch-size (or "
                  "data.batch_size when training)")


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` says an allocation failed: torch's CUDA OOM, its CPU allocator's, or Python's MemoryError."""
    return isinstance(e, _torch_oom_types()) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def _peer_gone(e: BaseException) -> bool:
    """Whether `e` is a collective of a torchrun job failing because another of its processes is gone."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def _torch_oom_types() -> tuple[type[BaseException], ...]:
    """MemoryError and torch.OutOfMemoryError (torch is imported by then: the command ran)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError, oom) if isinstance(oom, type) else (MemoryError,)


def _reader_gone() -> int:
    # `klvae info --json | head`: the reader left. Stop quietly, with the status a shell gives a tool killed by
    # SIGPIPE; stdout goes to /dev/null so that the interpreter's final flush does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _stopped_by(e: KeyboardInterrupt) -> int:
    """Report Ctrl-C or SIGTERM; the exit status a shell gives a process the signal ended."""
    if isinstance(e, _Terminated):
        print("klvae: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    return _interrupted()


def _interrupted() -> int:
    print("klvae: interrupted", file=sys.stderr)
    return 130


def _one_line(e: BaseException | str) -> str:
    # Messages quoted from torch, safetensors or a file can hold newlines; the error stays one line, and a file
    # name's control characters are escaped.
    return printable(" ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()))


if __name__ == "__main__":
    sys.exit(main())
