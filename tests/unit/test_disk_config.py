"""[disk]: its keys are checked like every section's, and a disk needs a QEMU guest."""

from __future__ import annotations

import pytest

from mirror.config import ConfigError, from_dict


def test_disk_defaults_to_none_and_takes_a_size() -> None:
    assert from_dict({}).disk.size_mib == 0
    cfg = from_dict({"guest": {"kind": "qemu"}, "disk": {"size_mib": 64}})
    assert cfg.disk.size_mib == 64
    assert cfg.disk_image == cfg.state_dir / "disk.img"
    assert cfg.disk.hang_ms == 2000  # a local call this long: the image hangs (fail over)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"disk": {"size_mib": 64}}, 'a disk needs guest.kind = "qemu"'),
        ({"guest": {"kind": "qemu"}, "disk": {"size_mib": 8, "port": 7400}},
         "[disk] port 7400 is also a [link] port"),
        ({"disk": {"journal_mib": 8}}, "journal_mib: value must be within 64"),
        ({"disk": {"probe_ms": 0}}, "probe_ms: value must be within 10"),
        ({"disk": {"hang_ms": -1}}, "hang_ms: value must be within 0"),
        ({"disk": {"size_mib": "big"}}, "size_mib: must be an integer"),
        ({"disk": {"cache": 1}}, "unknown key(s) cache"),
    ],
)  # fmt: skip
def test_bad_disk_settings_are_clear_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(data, "host.toml")
    assert message in str(e.value)


def test_status_shows_where_the_primary_disk_runs() -> None:
    from mirror.cli.status import status_rows

    def row(disk: dict[str, object]) -> object:
        rows = dict(status_rows({"role": "primary", "peer_node": "hostB", "disk": disk}))
        return rows.get("storage")

    assert row({"storage": "local"}) == "local"
    assert row({"storage": "remote", "storage_error": "write: Input/output error"}) == (
        "remote (hostB): local image failed: write: Input/output error"
    )
    assert str(row({"storage": "suspended", "storage_error": "read: x"})).startswith("suspended")
    assert "storage" not in dict(status_rows({"role": "primary"}))  # no disk: no row
