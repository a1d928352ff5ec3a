"""[libvirt] configuration: the domain is required with guest.kind = "libvirt"."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, load


def test_a_libvirt_guest_needs_its_domain_named(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[guest]\nkind = "libvirt"\nram_mib = 128\n')
    with pytest.raises(ConfigError, match=r'needs \[libvirt\] domain = "NAME"'):
        load(f)
    f.write_text('[guest]\nkind = "libvirt"\n[libvirt]\ndomain = "web01"\nqmp = "ssh"\n')
    with pytest.raises(ConfigError, match="qmp"):
        load(f)
    f.write_text('[guest]\nkind = "libvirt"\n[libvirt]\ndomain = "web01"\nqmp = "libvirt"\n')
    cfg = load(f)
    assert cfg.libvirt.domain == "web01" and cfg.libvirt.connect == "qemu:///system"
