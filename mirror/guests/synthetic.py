"""The synthetic guest: a small deterministic guest process for tests, demos and benches.

Its whole state is a RAM file (in /dev/shm) plus three registers (output
sequence, RNG state, cursor).  Each tick dirties pages with a chosen shape
and emits one numbered output whose payload depends on RAM contents, so a
guest resumed from a wrong image shows it.  Resumed from any committed
checkpoint it produces exactly the outputs the original would have.

The guest runs as its own process (``python -m mirror.guests.synthetic``),
writing the shared RAM file as a hypervisor would; the role drives it over
a socketpair with length-prefixed msgpack messages:

    role -> guest: ["init", {...}], ["pause"], ["resume"], ["state"], ["speed", s], ["quit"]
    guest -> role: ["ready"], ["outs", [[seq, payload], ...]], ["paused", seq],
                    ["state", bytes]

Outputs travel on the same ordered channel as the "paused" reply, so every
output made before a pause reaches the role before pause() returns.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import msgpack

from mirror._pagediff import ffi, lib
from mirror.config import GuestConfig
from mirror.guests import uffd
from mirror.guests.base import Guest, GuestError, GuestOutput, LogSource, OutputHandler
from mirror.guests.framing import ChannelClosed, recv_msg, send_msg

STATE_VERSION = 1
PAGE_SIZE: int = lib.PD_PAGE_SIZE
SHM_DIR = Path("/dev/shm")


class Shape(IntEnum):
    """Where a tick's writes land."""

    UNIFORM = 0
    HOT = 1  # 90% of writes in a hot set of hot_pct% of the pages
    SEQUENTIAL = 2


@dataclass(frozen=True)
class SyntheticParams:
    ram_mib: int = 64
    dirty_pages_per_s: int = 20000
    outputs_per_s: int = 200
    shape: Shape = Shape.UNIFORM
    hot_pct: int = 10
    seed: int = 1
    fill_pct: int = 50  # share of pages with content at boot
    dirty_outputs: int = 0  # the guest writes pages only until its Nth output; 0: always

    @classmethod
    def from_config(cls, guest: GuestConfig) -> SyntheticParams:
        return cls(
            ram_mib=guest.ram_mib,
            dirty_pages_per_s=guest.dirty_pages_per_s,
            outputs_per_s=guest.outputs_per_s,
            shape=Shape[guest.shape.upper()],
            hot_pct=guest.hot_pct,
            seed=guest.seed,
            fill_pct=guest.fill_pct,
            dirty_outputs=guest.dirty_outputs,
        )

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.ram_mib <= 1 << 20, "ram_mib", "1..1048576"),
            (0 <= self.dirty_pages_per_s <= 10**8, "dirty_pages_per_s", "0..100000000"),
            (1 <= self.outputs_per_s <= 100_000, "outputs_per_s", "1..100000"),
            (1 <= self.hot_pct <= 100, "hot_pct", "1..100"),
            (0 <= self.fill_pct <= 100, "fill_pct", "0..100"),
            (0 <= self.seed < 1 << 63, "seed", "0..2^63-1"),
            (0 <= self.dirty_outputs < 1 << 63, "dirty_outputs", "0..2^63-1"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(
                    f"synthetic guest: {name} must be {allowed}, got {getattr(self, name)}"
                )

    @property
    def npages(self) -> int:
        return self.ram_mib * 1024 * 1024 // PAGE_SIZE

    @property
    def hot_pages(self) -> int:
        return max(1, self.npages * self.hot_pct // 100)

    def pages_for_tick(self, seq: int) -> int:
        """Pages the tick that makes output ``seq + 1`` dirties (a pure function of seq)."""
        rate, per = self.dirty_pages_per_s, self.outputs_per_s
        if self.dirty_outputs and seq >= self.dirty_outputs:
            return 0  # the writer has stopped
        return (seq + 1) * rate // per - seq * rate // per

    def to_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["shape"] = int(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticParams:
        return cls(**{**d, "shape": Shape(d["shape"])})


def initial_regs(params: SyntheticParams) -> list[int]:
    return [0, params.seed, 0]


def pack_state(params: SyntheticParams, regs: list[int]) -> bytes:
    return bytes(msgpack.packb({"v": STATE_VERSION, "params": params.to_dict(), "regs": regs}))


def unpack_state(state: bytes) -> tuple[SyntheticParams, list[int]]:
    try:
        d = msgpack.unpackb(state, raw=False)
        if d["v"] != STATE_VERSION:
            raise GuestError(f"synthetic guest state version {d['v']}, expected {STATE_VERSION}")
        regs = [int(r) for r in d["regs"]]
        if len(regs) != 3:
            raise ValueError(f"{len(regs)} registers")
        return SyntheticParams.from_dict(d["params"]), regs
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise GuestError(f"malformed synthetic guest state: {e}") from e


class Cpu:
    """The deterministic core, usable in-process: tests use it as the reference."""

    def __init__(self, ram: Any, params: SyntheticParams, regs: list[int]) -> None:
        self.params = params
        self.regs = array("Q", regs)
        self._ram_p = ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        self._regs_p = ffi.from_buffer("uint64_t[]", self.regs)
        if len(ram) != params.npages * PAGE_SIZE:
            raise GuestError(f"RAM is {len(ram)} bytes, the guest has {params.ram_mib} MiB")

    def boot(self) -> None:
        lib.pd_synth_fill(self._ram_p, self.params.npages, self.params.seed, self.params.fill_pct)

    def tick(self) -> tuple[int, bytes]:
        p = self.params
        value = lib.pd_synth_tick(
            self._ram_p,
            p.npages,
            self._regs_p,
            p.pages_for_tick(self.regs[0]),
            int(p.shape),
            p.hot_pages,
        )
        return int(self.regs[0]), f"{value:016x}".encode()


def reference_outputs(params: SyntheticParams, count: int) -> list[tuple[int, bytes]]:
    """The first ``count`` outputs of a freshly booted guest, computed in-process."""
    ram = mmap.mmap(-1, params.npages * PAGE_SIZE)
    cpu = Cpu(ram, params, initial_regs(params))
    cpu.boot()
    return [cpu.tick() for _ in range(count)]


# ---- the guest process ---------------------------------------------------


class _Clock:
    """The guest's clock: seconds since it first ran, going at ``speed`` of the wall clock."""

    def __init__(self, speed: float) -> None:
        self._base, self._at, self.speed = 0.0, time.monotonic(), speed

    def now(self) -> float:
        return self._base + (time.monotonic() - self._at) * self.speed

    def set_speed(self, speed: float) -> None:
        self._base, self._at, self.speed = self.now(), time.monotonic(), speed

    def until(self, t: float) -> float:
        """Wall-clock seconds until the guest's clock reads ``t``."""
        return max(0.0, (t - self.now()) / self.speed)


def _guest_main(fd: int) -> int:
    # The role drives this process and stops it over the channel; a SIGTERM to the
    # host's process group is the role's to handle (it pauses and stops us
    # cleanly).  If the role dies, the channel closes and we end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    try:
        init = recv_msg(sock)  # a ready standby waits here until it is needed
    except ChannelClosed:
        return 0
    if init[0] != "init":
        raise SystemExit(f"synthetic guest: expected init, got {init[0]!r}")
    params = SyntheticParams.from_dict(init[1]["params"])
    with open(init[1]["ram"], "r+b") as f:
        ram = mmap.mmap(f.fileno(), params.npages * PAGE_SIZE)
    cpu = Cpu(ram, params, init[1]["regs"])
    if init[1]["boot"]:
        cpu.boot()
    send_msg(sock, ["ready"])
    # Rates are wall-clock rates: time spent paused is made up after the resume
    # (a backlog of at most half a second), so the configured dirty rate is what
    # the checkpoints see whatever share of the epoch the pause takes.
    # Throttled (["speed", s], the role's throttle), the guest's clock runs at s of the
    # wall clock: its ticks, and so its writes and outputs, come at s of the rate.
    running, clock, done, speed = False, None, 0, 1.0
    rate = params.outputs_per_s
    burst = max(1, rate // 50)  # stay responsive to the role: at most 20 ms of ticks at once
    while True:
        timeout: float | None = None
        if running and clock is not None:
            due = int(clock.now() * rate) - done
            if due > rate // 2:
                done += due - rate // 2
                due = rate // 2
            if due > 0:
                outs = [cpu.tick() for _ in range(min(due, burst))]
                done += len(outs)
                send_msg(sock, ["outs", outs])
                timeout = 0
            else:
                timeout = clock.until((done + 1) / rate)
        if not select.select([sock], [], [], timeout)[0]:
            continue
        try:
            msg = recv_msg(sock)
        except ChannelClosed:
            return 0
        match msg[0]:
            case "pause":
                running = False
                send_msg(sock, ["paused", int(cpu.regs[0])])
            case "resume":
                running = True
                if clock is None:
                    clock = _Clock(speed)
            case "speed":
                speed = min(1.0, max(0.01, float(msg[1])))
                if clock is not None:
                    clock.set_speed(speed)
            case "state":
                send_msg(sock, ["state", pack_state(params, list(cpu.regs))])
            case "quit":
                return 0


# ---- the role's handle on it ------------------------------------------------


class SyntheticGuest(Guest):
    """A synthetic guest process whose RAM is a shared file."""

    kind = "synthetic"

    def __init__(
        self,
        ram_path: Path,
        params: SyntheticParams,
        regs: list[int],
        *,
        boot: bool,
        on_output: OutputHandler,
        owns_ram: bool,
        process: GuestProcess | None = None,
    ) -> None:
        """``process``: a guest process spawned ahead (a ready standby), else a new one."""
        self._ram_path = ram_path
        self.params = params
        self._owns_ram = owns_ram
        self._on_output = on_output
        self._paused = threading.Event()
        self._replies: queue.Queue[Any] = queue.Queue()
        self._stopped = False
        size = params.npages * PAGE_SIZE
        with open(ram_path, "r+b") as f:
            if os.fstat(f.fileno()).st_size != size:
                raise GuestError(
                    f"RAM file {ram_path} is {os.fstat(f.fileno()).st_size} bytes, "
                    f"the guest has {size}"
                )
            self._ram = mmap.mmap(f.fileno(), size)
        process = process or GuestProcess.spawn()
        self._sock, self._proc = process.sock, process.proc
        self._uffd_sock = process.uffd_sock
        send_msg(
            self._sock,
            [
                "init",
                {"params": params.to_dict(), "regs": regs, "boot": boot, "ram": str(ram_path)},
            ],
        )
        self._reader = threading.Thread(target=self._read, name="synthetic-guest", daemon=True)
        self._reader.start()
        self._expect("ready", timeout=60)
        self._paused.set()  # booted paused; resume() starts it

    @classmethod
    def boot(
        cls, params: SyntheticParams, ram_path: Path, on_output: OutputHandler
    ) -> SyntheticGuest:
        """A fresh guest: creates its RAM file and fills it as its boot does."""
        create_ram_file(ram_path, params.npages * PAGE_SIZE)
        try:
            return cls(
                ram_path,
                params,
                initial_regs(params),
                boot=True,
                on_output=on_output,
                owns_ram=True,
            )
        except BaseException:
            ram_path.unlink(missing_ok=True)
            raise

    @classmethod
    def launch_from(
        cls,
        image_path: Path,
        state: bytes,
        on_output: OutputHandler,
        *,
        owns_ram: bool = False,
        process: GuestProcess | None = None,
    ) -> SyntheticGuest:
        """A guest that goes on from a RAM image and a saved state (a checkpoint),
        in ``process`` if one was spawned ahead."""
        params, regs = unpack_state(state)
        return cls(
            image_path,
            params,
            regs,
            boot=False,
            on_output=on_output,
            owns_ram=owns_ram,
            process=process,
        )

    def _read(self) -> None:
        try:
            while True:
                msg = recv_msg(self._sock)
                match msg[0]:
                    case "outs":
                        now = time.monotonic()
                        for seq, payload in msg[1]:
                            self._on_output(GuestOutput(seq, payload, now))
                    case "paused":
                        self._paused.set()
                    case _:
                        self._replies.put(msg)
        except (ChannelClosed, OSError):
            self._replies.put(["closed"])
            self._paused.set()

    def _expect(self, what: str, timeout: float = 10) -> Any:
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise GuestError(f"synthetic guest did not answer {what!r} in {timeout:g} s") from None
        if msg[0] != what:
            raise GuestError(
                f"synthetic guest answered {msg[0]!r} to {what!r} (exit code {self._proc.poll()})"
            )
        return msg

    @property
    def ram(self) -> mmap.mmap:
        return self._ram

    @property
    def ram_path(self) -> Path:
        return self._ram_path

    @property
    def alive(self) -> bool:
        return not self._stopped and self._proc.poll() is None

    def log_source(self) -> LogSource | None:
        return LogSource(self._proc.pid, self._uffd_sock) if self._uffd_sock else None

    def pause(self) -> None:
        self._paused.clear()
        send_msg(self._sock, ["pause"])
        if not self._paused.wait(10) or not self.alive:
            raise GuestError("synthetic guest did not pause")

    def resume(self) -> None:
        send_msg(self._sock, ["resume"])

    def throttle_blocker(self) -> str | None:
        return None  # its writer runs at a speed the role sets

    def set_speed(self, speed: float) -> None:
        send_msg(self._sock, ["speed", float(speed)])

    def save_state(self) -> bytes:
        send_msg(self._sock, ["state"])
        return bytes(self._expect("state")[1])

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            send_msg(self._sock, ["quit"])
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._sock.close()
        if self._owns_ram:  # first: a view of RAM still held elsewhere must not keep the file
            self._ram_path.unlink(missing_ok=True)
        with contextlib.suppress(BufferError):  # unmapped when the last view goes
            self._ram.close()


class GuestProcess:
    """A synthetic guest process, started ahead of need: it idles until it is given
    its RAM and registers.  A standby keeps one ready so that a promotion does not
    wait for a new process to start (about 150 ms here)."""

    def __init__(
        self, sock: socket.socket, proc: subprocess.Popen[bytes], uffd_sock: str = ""
    ) -> None:
        self.sock, self.proc, self.uffd_sock = sock, proc, uffd_sock

    @classmethod
    def spawn(cls) -> GuestProcess:
        """A new guest process; it hands out userfaultfds of its mm (the dirty-page
        log) at an abstract socket when the preload library is built."""
        ours, theirs = socket.socketpair()
        name = uffd.unique_name("synthetic")
        env = uffd.preload_env(name)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirror.guests.synthetic", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        return cls(ours, proc, name if env is not None else "")

    def close(self) -> None:
        """End a process that was never used (it exits when its channel closes)."""
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def create_ram_file(path: Path, size: int) -> None:
    """A new RAM file of ``size`` bytes, all of it allocated now (clear error if not)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise GuestError(f"cannot allocate {size >> 20} MiB for {path}: {e.strerror}") from e
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="synthetic guest process (started by mirror)")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    return _guest_main(args.fd)


if __name__ == "__main__":
    sys.exit(main())
