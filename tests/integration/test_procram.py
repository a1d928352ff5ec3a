"""Private RAM read from outside its process (mirror/guests/procram.py) with a dirty-page
log whose userfaultfd was made inside that process by injection (uffd.inject): a real
writer process with private anonymous memory (transparent huge pages asked for, as QEMU
does), thousands of random writes while the log is scanned and the written pages gathered
into a copy; at the end the copy equals the process's memory, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from array import array

import pytest
from mirror._pagediff import ffi, lib

from mirror.guests import uffd
from mirror.guests.base import GuestError
from mirror.guests.procram import ProcessRam
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd

if dirtylog.probe() is not None:
    pytest.skip(f"no dirty-page log here: {dirtylog.probe()}", allow_module_level=True)

PAGES = 8192  # 32 MiB
WRITER = r"""
PAGES = {pages}
import ctypes, mmap, os, random, sys, time
m = mmap.mmap(-1, PAGES * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
m[:] = os.urandom(len(m))  # populated: huge pages where the kernel gives them
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
sys.stdin.readline()  # the log is set up
r = random.Random(7)
while True:  # random pages, each a few bytes at a random place
    p = r.randrange(PAGES)
    o = p * 4096 + r.randrange(4088)
    m[o:o + 8] = r.randbytes(8)
    if r.random() < 0.001:
        time.sleep(0.0005)
""".replace("{pages}", str(PAGES))


def test_a_log_made_by_injection_sees_every_write_to_private_memory() -> None:
    w = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    fd = pm = -1
    try:
        assert w.stdout is not None and w.stdin is not None
        base = int(w.stdout.readline(), 16)
        ram = ProcessRam(w.pid, base, PAGES * 4096)
        fd = uffd.inject(w.pid)
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        held = [os.readlink(f"/proc/{w.pid}/fd/{x}") for x in os.listdir(f"/proc/{w.pid}/fd")]
        assert "anon_inode:[userfaultfd]" not in held  # the writer's copy closed at once
        assert lib.dl_uffd_setup(fd, base, PAGES * 4096) == 0
        pm = os.open(f"/proc/{w.pid}/pagemap", os.O_RDONLY)
        out = ffi.new(f"uint32_t[{PAGES}]")
        assert lib.dl_scan(pm, base, PAGES, 1, out, PAGES) >= 0  # protect all
        copy = pd.alloc_pages(PAGES)
        ram.read_range(0, PAGES, copy)  # the copy starts as memory is now
        w.stdin.write("go\n")
        w.stdin.flush()
        logged = 0

        def catch_up() -> None:
            nonlocal logged
            n = lib.dl_scan(pm, base, PAGES, 1, out, PAGES)
            assert n >= 0
            pages = array("I", (out[i] for i in range(n)))
            logged += n
            batch = pd.gather(ram, pages)  # read from the writer's memory
            pd.apply_encoded(copy, batch)

        for _ in range(300):
            catch_up()
        os.kill(w.pid, signal.SIGSTOP)  # as a checkpoint pauses the guest
        catch_up()
        whole = pd.alloc_pages(PAGES)
        ram.read_range(0, PAGES, whole)
        differ = [p for p in range(PAGES)
                  if whole[p * 4096:(p + 1) * 4096] != copy[p * 4096:(p + 1) * 4096]]
        assert differ == [], f"{len(differ)} written pages the log missed"
        assert logged > 2000  # the writer really wrote while the log ran
    finally:
        for f in (fd, pm):
            if f >= 0:
                os.close(f)
        w.kill()
        w.wait()


def test_a_gone_process_reads_as_a_clear_error() -> None:
    w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w.kill()
    w.wait()
    with pytest.raises(GuestError, match=r"gone|failed"):
        ProcessRam(w.pid, 0x10000, 4096)
    with pytest.raises(GuestError, match="no userfaultfd made inside process"):
        uffd.inject(w.pid)
