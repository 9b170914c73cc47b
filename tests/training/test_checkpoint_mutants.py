"""Pins what a mutation audit of the checkpoint, checksum, progress and distributed modules found untested:
the RNG round trip for torch, Python and NumPy; signals_held's nesting, its first-caught delivery, its single
interrupt on a second Ctrl-C and its no-op outside the main thread; save_checkpoint's default and keep=1
pruning; list_checkpoints' strict names, order and missing folder; load_checkpoint's messages (unreadable file,
foreign pickles with and without mmap, a non-dict); load_training_state's key, counter and mapping checks and
its message; optimizer_state_problem's structure, id, amsgrad, older-torch switch and count checks;
file_sha256's chunked hashing and progress; progress_bar's own-logger quieting and explicit disable;
BarAwareHandler's stream, flush and error handling; and init_distributed, all_sum, all_mean,
average_gradients and shutdown with torch.distributed's calls stubbed."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import one_line
from klvae import distributed
from klvae.checksum import file_sha256
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError
from klvae.progress import BarAwareHandler, progress_bar
from klvae.training import checkpoint as ckpt


class Foreign:
    """An object that torch.load(weights_only=True) must refuse to unpickle."""

    def __init__(self) -> None:
        self.x = 1


# ---------------------------------------------------------------- RNG state


def test_rng_state_round_trips_torch_python_and_numpy() -> None:
    state = ckpt.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(3))
    ckpt.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    assert np.array_equal(first[2], again[2])


# ---------------------------------------------------------------- signals_held


def test_a_nested_hold_keeps_the_outer_handler() -> None:
    with ckpt.signals_held():
        outer = signal.getsignal(signal.SIGINT)
        assert getattr(outer, "klvae_hold", False)
        with ckpt.signals_held():
            assert signal.getsignal(signal.SIGINT) is outer
        assert signal.getsignal(signal.SIGINT) is outer
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_raises_one_interrupt_only() -> None:
    with pytest.raises(KeyboardInterrupt) as caught, ckpt.signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    assert caught.value.__context__ is None  # not raised again when the block ends


def test_the_first_signal_caught_is_the_one_delivered() -> None:
    got: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in before:
            signal.signal(s, lambda signum, frame: got.append(signum))
        with ckpt.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_clean_block_puts_both_handlers_back() -> None:
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with ckpt.signals_held():
        assert all(getattr(signal.getsignal(s), "klvae_hold", False) for s in (signal.SIGINT, signal.SIGTERM))
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_a_hold_outside_the_main_thread_is_a_no_op(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            ckpt.save_checkpoint({"step": 1}, tmp_path, 1)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == []
    assert ckpt.load_checkpoint(tmp_path / "step_00000001.pt") == {"step": 1}


# ---------------------------------------------------------------- save / list / latest


def test_save_keeps_the_newest_two_by_default_and_one_when_asked(tmp_path: Path) -> None:
    for step in range(1, 5):
        ckpt.save_checkpoint({"step": step}, tmp_path / "a", step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "a")] == ["step_00000003.pt", "step_00000004.pt"]
    for step in range(1, 4):
        path = ckpt.save_checkpoint({"step": step}, tmp_path / "b", step, keep=1)
    assert path == tmp_path / "b" / "step_00000003.pt"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step_00000003.pt"]
    for step in range(1, 4):
        ckpt.save_checkpoint({"step": step}, tmp_path / "c", step, keep=0)  # 0: keep all
    assert len(ckpt.list_checkpoints(tmp_path / "c")) == 3


def test_only_complete_step_files_are_listed_in_step_order(tmp_path: Path) -> None:
    steps = [7, 2, 11, 5, 3, 13, 1, 9, 4, 12, 6, 10, 8]
    for s in steps:
        (tmp_path / f"step_{s:08d}.pt").write_bytes(b"x")
    for name in (
        "step_00000099.pt.bak",
        "step_99.pt",
        "step_000000099.pt",
        ".step_00000099.pt.1.abc.tmp",
        "xstep_00000099.pt",
    ):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"step_{s:08d}.pt" for s in sorted(steps)]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000013.pt"


def test_a_missing_folder_has_no_checkpoints(tmp_path: Path) -> None:
    assert ckpt.list_checkpoints(tmp_path / "nowhere") == []
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- load_checkpoint


def test_an_unreadable_checkpoint_is_named_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "gone.pt"
    with pytest.raises(KlvaeError) as e:
        ckpt.load_checkpoint(path)
    assert one_line(e) == f"cannot read checkpoint {path}: No such file or directory"


@pytest.mark.parametrize("mmap", [False, True])
def test_a_pickled_object_is_refused_not_unpickled(tmp_path: Path, mmap: bool) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"step": 1, "obj": Foreign()}, path)
    with pytest.raises(KlvaeError) as e:
        ckpt.load_checkpoint(path, mmap=mmap)
    assert one_line(e) == f"{path} is not a klvae checkpoint: torch.load(weights_only=True) cannot read it"


def test_a_file_mmap_cannot_map_reads_as_without_mmap(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"step": 3}, path, _use_new_zipfile_serialization=False)
    assert ckpt.load_checkpoint(path, mmap=True) == {"step": 3}
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(KlvaeError) as e:
        ckpt.load_checkpoint(png, mmap=True)
    assert one_line(e) == f"{png} is not a klvae checkpoint: torch.load(weights_only=True) cannot read it"


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(KlvaeError) as e:
        ckpt.load_checkpoint(path)
    assert one_line(e) == f"{path} is not a klvae checkpoint: it holds a list, not a dict"


# ---------------------------------------------------------------- load_training_state


_DROP = object()


def _state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": 0,
        "batches_done": 0,
        "nonfinite_run": 0,
        "vae": {"w": torch.zeros(2)},
        "loss": {"l": torch.zeros(1)},
        "opt_ae": {},
        "scaler": {},
        "d_scaler": {},
        "rng": {},
        "ema": None,
        "opt_d": None,
    }
    state.update(changes)
    return {k: v for k, v in state.items() if v is not _DROP}


def _load(tmp_path: Path, state: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "step_00000001.pt"
    torch.save(state, path)
    return path, ckpt.load_training_state(path)


def test_a_complete_state_at_step_0_loads(tmp_path: Path) -> None:
    _, state = _load(tmp_path, _state(ema={"w": torch.ones(2)}, opt_d={}))
    assert state["step"] == 0 and torch.equal(state["ema"]["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        (("rng",), "rng"),
        (("nonfinite_run",), "nonfinite_run"),
        (("step", "scaler"), "step, scaler"),
    ],
)
def test_a_state_without_a_required_entry_names_all_it_lacks(tmp_path: Path, drop: tuple[str, ...], named: str) -> None:
    state = _state(**dict.fromkeys(drop, _DROP))
    with pytest.raises(KlvaeError) as e:
        _load(tmp_path, state)
    shown = ", ".join(list(state)[:5])
    assert one_line(e) == (
        f"{tmp_path / 'step_00000001.pt'} is not a klvae training checkpoint: it has no {named} (it holds {shown}, ...)"
    )


@pytest.mark.parametrize(
    ("state", "holds"),
    [
        ({}, "nothing"),
        ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, "a, b, c, d, e"),
        ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}, "a, b, c, d, e, ..."),
    ],
)
def test_a_foreign_state_says_what_it_holds(tmp_path: Path, state: dict[str, Any], holds: str) -> None:
    with pytest.raises(
        KlvaeError,
        match=r"it has no step, batches_done, nonfinite_run, vae, loss, opt_ae, scaler, "
        r"d_scaler, rng \(it holds (.*)\)$",
    ) as e:
        _load(tmp_path, state)
    assert one_line(e).endswith(f"(it holds {holds})")


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        ({"step": True}, "step"),
        ({"batches_done": -1}, "batches_done"),
        ({"nonfinite_run": 1.0}, "nonfinite_run"),
        ({"rng": [1]}, "rng"),
        ({"opt_ae": None}, "opt_ae"),
        ({"ema": [torch.zeros(1)]}, "ema"),
        ({"opt_d": 3}, "opt_d"),
        ({"ema": {"w": 1.0}}, "ema"),
        ({"loss": {"l": 1.0}}, "loss"),
        ({"vae": {"w": "x"}}, "vae"),
        ({"step": -2, "loss": {"l": [1]}}, "step, loss"),
    ],
)
def test_a_malformed_entry_is_named(tmp_path: Path, changes: dict[str, Any], bad: str) -> None:
    with pytest.raises(KlvaeError) as e:
        _load(tmp_path, _state(**changes))
    assert one_line(e) == f"{tmp_path / 'step_00000001.pt'} is not a complete klvae checkpoint: malformed {bad}"


# ---------------------------------------------------------------- optimizer_state_problem


def _adam(**kwargs: Any) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Adam over two parameters after one step, and its state_dict."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.Adam(params, **kwargs)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt, opt.state_dict()


def test_a_fresh_state_with_zero_weight_decay_fits() -> None:
    opt, saved = _adam(weight_decay=0)
    assert ckpt.optimizer_state_problem(opt, saved) is None


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda s: s.update(param_groups="x"), "it is not a mapping of state and param_groups"),
        (
            lambda s: s["param_groups"][0].update(params=(0, 1)),
            "a param_groups entry is not a mapping with a params list",
        ),
        (
            lambda s: s["param_groups"][0].update(params=[0, 0]),
            "param_groups name their parameters other than by distinct integers",
        ),
        (
            lambda s: s["param_groups"][0].update(params=[0, True]),
            "param_groups name their parameters other than by distinct integers",
        ),
        (
            lambda s: s["param_groups"][0].update(params=["a", "b"]),
            "param_groups name their parameters other than by distinct integers",
        ),
        (
            lambda s: s["param_groups"][0].update(amsgrad=1),
            "param_groups[0] amsgrad is 1, not like this optimiser's False",
        ),
        (
            lambda s: s["param_groups"][0].update(lr=float("inf")),
            "param_groups[0] lr is inf, not like this optimiser's 0.001",
        ),
        (lambda s: s["state"][0].update(step=torch.zeros(0)), "state[0] step is tensor([]), not a count"),
        (lambda s: s["state"][0].update(step=True), "state[0] step is True, not a count"),
        (lambda s: s["state"][0].update(step=-1), "state[0] step is -1, not a count"),
        (lambda s: s["state"].update({0: [1]}), "state[0] is a list, not a mapping"),
        (lambda s: s["state"][0].pop("step"), "state[0] lacks step"),
        (lambda s: s["state"][1].update(exp_avg=1.0), "state[1] 'exp_avg' is a float, not a tensor"),
    ],
)
def test_a_tampered_optimiser_state_is_described(tamper: Any, problem: str) -> None:
    opt, saved = _adam()
    tamper(saved)
    assert ckpt.optimizer_state_problem(opt, saved) == problem


def test_an_amsgrad_state_needs_its_maximum() -> None:
    opt, saved = _adam(amsgrad=True)
    assert ckpt.optimizer_state_problem(opt, saved) is None
    del saved["state"][1]["max_exp_avg_sq"]
    assert ckpt.optimizer_state_problem(opt, saved) == "state[1] lacks max_exp_avg_sq"


def test_switches_an_older_torch_lacks_or_leaves_unset_are_accepted() -> None:
    opt, saved = _adam()
    group = saved["param_groups"][0]
    del group["foreach"], group["maximize"]
    group["amsgrad"] = None
    assert ckpt.optimizer_state_problem(opt, saved) is None


def test_another_number_of_parameters_is_left_to_load_state_dict() -> None:
    opt, saved = _adam()
    saved["param_groups"][0]["params"] = [0]
    assert ckpt.optimizer_state_problem(opt, saved) is None


# ---------------------------------------------------------------- file_sha256


@pytest.mark.parametrize("size", [0, 10, (4 << 20) + 10])
def test_file_sha256_hashes_every_chunk_and_reports_each(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    seen: list[int] = []
    assert file_sha256(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert seen == ([4 << 20, 10] if size > 10 else [size] if size else [])
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- progress


def test_bars_follow_the_klvae_loggers_own_level_and_an_explicit_disable() -> None:
    root, klvae_log = logging.getLogger(), logging.getLogger("klvae")
    before = root.level
    try:
        root.setLevel(logging.WARNING)  # a library user's root level does not hide the bars
        klvae_log.setLevel(logging.NOTSET)
        assert not progress_bar(range(2), file=io.StringIO()).disable
        assert progress_bar(range(2), disable=True, file=io.StringIO()).disable
        klvae_log.setLevel(logging.INFO)
        assert not progress_bar(range(2), file=io.StringIO()).disable
        klvae_log.setLevel(logging.WARNING)
        assert progress_bar(range(2), file=io.StringIO()).disable
    finally:
        root.setLevel(before)
        klvae_log.setLevel(logging.NOTSET)


class _Stream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def _record(msg: str = "hello") -> logging.LogRecord:
    return logging.LogRecord("klvae.t", logging.INFO, __file__, 1, msg, None, None)


def test_the_bar_aware_handler_writes_to_its_stream_and_flushes(capsys: pytest.CaptureFixture[str]) -> None:
    stream = _Stream()
    BarAwareHandler(stream).emit(_record())
    assert stream.getvalue() == "hello\n" and stream.flushes >= 1
    assert capsys.readouterr() == ("", "")


def test_the_bar_aware_handler_hands_errors_to_handle_error_but_not_recursion() -> None:
    handler = BarAwareHandler(io.StringIO())
    handled: list[logging.LogRecord] = []
    handler.handleError = handled.append  # type: ignore[method-assign]
    record = _record()
    handler.format = lambda r: (_ for _ in ()).throw(ValueError("bad"))  # type: ignore[method-assign]
    handler.emit(record)
    assert handled == [record]
    handler.format = lambda r: (_ for _ in ()).throw(RecursionError())  # type: ignore[method-assign]
    with pytest.raises(RecursionError):
        handler.emit(record)
    assert handled == [record]


# ---------------------------------------------------------------- distributed, with torch.distributed stubbed


@pytest.mark.parametrize(("device_type", "backend"), [("cuda", "nccl"), ("cpu", "gloo")])
def test_init_distributed_joins_with_the_backend_for_the_device(
    device_type: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert distributed.init_distributed(device_type) == DistInfo(rank=3, world=4, local_rank=1)
    assert calls == [backend]
    assert distributed.init_distributed(device_type) == DistInfo(rank=3, world=4, local_rank=1)
    assert calls == [backend]  # already joined: not again


def _fake_reduce(world: int, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """all_reduce as `world` ranks holding the same tensor would see it (SUM: times world; MIN: unchanged)."""
    ops: list[Any] = []

    def all_reduce(t: torch.Tensor, op: Any) -> None:
        ops.append(op)
        if op == dist.ReduceOp.SUM:
            t.mul_(world)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return ops


def test_all_sum_and_all_mean_leave_the_input_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_reduce(4, monkeypatch)
    info = DistInfo(rank=0, world=4)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_sum(t, info), torch.tensor([4.0, 8.0]))
    assert torch.equal(t, torch.tensor([1.0, 2.0]))
    assert torch.equal(distributed.all_mean(t, info), t)
    assert distributed.all_sum(t, DistInfo()) is t and distributed.all_mean(t, DistInfo()) is t


def test_average_gradients_puts_each_average_back_in_its_own_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = _fake_reduce(3, monkeypatch)
    a, b, c = (torch.nn.Parameter(torch.zeros(s)) for s in ((2, 2), (3,), (1,)))
    a.grad, c.grad = torch.arange(4.0).view(2, 2), torch.tensor([7.0])
    distributed.average_gradients([a, b, c], DistInfo(rank=1, world=3))
    assert torch.equal(a.grad, torch.arange(4.0).view(2, 2)) and b.grad is None
    assert torch.equal(c.grad, torch.tensor([7.0]))
    assert ops == [dist.ReduceOp.SUM]
    distributed.average_gradients([b], DistInfo(rank=1, world=3))  # no gradient at all: no collective
    assert ops == [dist.ReduceOp.SUM]


def test_shutdown_leaves_only_a_group_that_was_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    destroyed: list[bool] = []
    joined = [False]
    monkeypatch.setattr(dist, "is_initialized", lambda: joined[0])
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
    distributed.shutdown(DistInfo(rank=0, world=2))
    assert destroyed == []
    joined[0] = True
    distributed.shutdown(DistInfo())
    assert destroyed == []
    distributed.shutdown(DistInfo(rank=0, world=2))
    assert destroyed == [True]
