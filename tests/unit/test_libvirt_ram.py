"""Where a libvirt domain's RAM is (mirror/guests/libvirtram.py), with a fake QMP monitor
and this test's own process standing in for QEMU: its memfds are real, so the search
through /proc is the real one; and the scan `mirror status` names."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mirror.guests.base import GuestError
from mirror.guests.libvirtqmp import Monitor
from mirror.guests.libvirtram import find_ram

SIZE = 4 << 20


class FakeQom(Monitor):
    """QOM's /objects with the given backends (name -> properties)."""

    def __init__(self, backends: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.backends = backends

    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        assert args is not None
        if name == "qom-list":
            other = [{"name": "type", "type": "string"}, {"name": "s0", "type": "child<secret>"}]
            return other + [
                {"name": n, "type": f"child<{p['type']}>"} for n, p in self.backends.items()
            ]
        assert name == "qom-get"
        return self.backends[args["path"].removeprefix("/objects/")][args["property"]]


def memfd_backend(**kw: Any) -> dict[str, Any]:
    return {"type": "memory-backend-memfd", "share": True, "hugetlb": False, "size": SIZE, **kw}


@pytest.fixture
def qemu_memfds() -> Iterator[list[tuple[int, mmap.mmap]]]:
    """The memfds a test makes (add_memfd), closed after it."""
    made: list[tuple[int, mmap.mmap]] = []
    yield made
    for fd, m in made:
        m.close()
        os.close(fd)


def add_memfd(made: list[tuple[int, mmap.mmap]], size: int = SIZE, *, mapped: bool = True) -> int:
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED if mapped else mmap.MAP_PRIVATE)
    made.append((fd, m))
    return fd


def test_the_one_shared_memfd_of_the_backends_size_is_the_ram(
    qemu_memfds: list[tuple[int, mmap.mmap]],
) -> None:
    add_memfd(qemu_memfds, SIZE * 2)  # another size: not it
    add_memfd(qemu_memfds, mapped=False)  # mapped private: not it
    fd = add_memfd(qemu_memfds)
    ram = find_ram(FakeQom({"pc.ram": memfd_backend()}), os.getpid(), "web01")
    assert ram.backing == "memfd" and ram.size == SIZE and ram.backend == "/objects/pc.ram"
    assert os.stat(ram.path).st_ino == os.fstat(fd).st_ino
    assert str(ram.path).startswith(f"/proc/{os.getpid()}/fd/")


def test_two_candidates_are_an_error_not_a_pick(qemu_memfds: list[tuple[int, mmap.mmap]]) -> None:
    add_memfd(qemu_memfds)
    add_memfd(qemu_memfds)
    with pytest.raises(GuestError, match=r"2 shared memfds of 4 MiB.*nothing guessed"):
        find_ram(FakeQom({"pc.ram": memfd_backend()}), os.getpid(), "web01")


def test_none_is_an_error(qemu_memfds: list[tuple[int, mmap.mmap]]) -> None:
    with pytest.raises(GuestError, match="0 shared memfds"):
        find_ram(FakeQom({"pc.ram": memfd_backend()}), os.getpid(), "web01")


@pytest.mark.parametrize(
    "backends,words",
    [
        ({"pc.ram": {"type": "memory-backend-ram"}}, r"private anonymous memory .* --prepare"),
        ({"pc.ram": memfd_backend(share=False)}, r"mapped private .* --prepare"),
        ({"pc.ram": memfd_backend(hugetlb=True)}, "hugetlbfs memfd"),
        ({"ram-node0": memfd_backend(), "ram-node1": memfd_backend()}, "2 RAM backends"),
        ({}, "0 RAM backends"),
        ({"pc.ram": {"type": "memory-backend-epc"}}, "cannot map"),
        ({"pc.ram": {"type": "memory-backend-file", "share": True, "size": SIZE,
                     "mem-path": "/nonexistent/pc.ram"}}, "its RAM file /nonexistent"),
    ],
)
def test_what_cannot_be_mapped_says_what_to_change(backends: dict[str, Any], words: str) -> None:
    with pytest.raises(GuestError, match=words):
        find_ram(FakeQom(backends), os.getpid(), "web01")


def test_a_shared_file_is_mapped_from_its_path(tmp_path: Any) -> None:
    f = tmp_path / "pc.ram"
    f.write_bytes(bytes(SIZE))
    backend = {"type": "memory-backend-file", "share": True, "size": SIZE, "mem-path": str(f)}
    ram = find_ram(FakeQom({"pc.ram": backend}), os.getpid(), "web01")
    assert (ram.path, ram.backing) == (f, "file")


def test_status_says_which_scan_runs() -> None:
    from mirror.cli.status import status_rows

    note = "no dirty-page log: the libvirt guest was not started with the preload library"
    rows = dict(status_rows({"role": "primary", "summary": {"scan": "hashed", "scan_note": note}}))
    assert rows["scan"] == f"hashed ({note})"
    assert dict(status_rows({"role": "primary", "summary": {"scan": "log"}}))["scan"] == "log"
