"""`mirror demo`: a primary and a secondary on this machine, then a summary;
`mirror image build`: the demo guest's kernel and initramfs. The demos (mirror/lab)
are imported by these commands only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import json_flag, within

if TYPE_CHECKING:  # imported by the commands: not by `mirror --help`
    from mirror.config import Config

# mirror.guests.image.DEFAULT_DIR, in words (resolved when a command runs)
IMAGE_DIR_HELP = ("default $MIRROR_IMAGE_DIR, else /var/cache/mirror/guest as root, "
                  "~/.cache/mirror/guest otherwise")


def _image_dir(given: str | None) -> Path:
    from mirror.guests import image

    return Path(given) if given else image.DEFAULT_DIR


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("image", help="the demo guest's kernel and initramfs")
    p.add_argument("action", choices=["build"], help="build (or rebuild) the guest image")
    p.add_argument("--dir", help=f"where to put it ({IMAGE_DIR_HELP})")

    p = sub.add_parser(
        "demo", help="a primary and a secondary on this machine, then a summary",
        description="A primary and a secondary on this machine, then a summary. Exit 0: "
        "the demo held (synthetic: the observer saw no gap, no duplicate and one source at "
        "a time, and with --kill-after the secondary promoted; qemu, libvirt: the client's "
        "TCP connection survived the kill); 1: it did not (the summary says what); 2: an "
        "error.")
    p.add_argument(
        "--guest",
        choices=["synthetic", "qemu", "libvirt"],
        default="synthetic",
        help="synthetic (default): a synthetic guest on loopback; qemu: a QEMU guest in "
        "network namespaces whose client's TCP connection survives the kill of its host "
        "(needs root); libvirt: the same with a libvirt domain (each host runs its own "
        "libvirtd)",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="--guest libvirt: the domain as virt-install leaves it (private RAM, no "
        "preload), running with the client connected, then paired as it runs with "
        "`mirror pair --live` (no restart)",
    )
    p.add_argument("--config", help="base configuration (TOML); the options below override it")
    p.add_argument(
        "--ram-mib",
        type=within(int, 1, 1 << 20),
        help="guest RAM (default: --config's [guest] ram_mib, else 256; 128 for --guest "
        "qemu|libvirt)",
    )
    p.add_argument(
        "--dirty-rate",
        type=within(int, 0, 10**8),
        metavar="PAGES_PER_S",
        help="pages the guest dirties per second (default 20000)",
    )
    p.add_argument(
        "--outputs-per-s",
        type=within(int, 1, 100_000),
        help="outputs the guest emits per second (default 200)",
    )
    p.add_argument(
        "--shape",
        choices=["uniform", "hot", "sequential"],
        help="where the guest's writes land (default uniform)",
    )
    p.add_argument("--epoch-ms", type=within(int, 10, 1000), help="epoch (default 50)")
    p.add_argument(
        "--scan",
        choices=["auto", "log", "hashed", "exact"],
        help="dirty-page scan (default auto: the dirty-page log where the kernel has it)",
    )
    p.add_argument(
        "--duration",
        type=within(float, 0.5, 1e6),
        default=10.0,
        metavar="S",
        help="seconds of checkpoints (default 10)",
    )
    p.add_argument(
        "--observer",
        metavar="HOST:PORT",
        help="send the outputs to this TCP endpoint instead of the built-in observer",
    )
    p.add_argument(
        "--kill-after",
        type=within(float, 0.5, 1e6),
        metavar="S",
        help="SIGKILL the primary host's whole process group S seconds after it "
        "starts (--guest qemu: after the client connected; default 5 there); the "
        "secondary promotes and the guest goes on there",
    )
    p.add_argument(
        "--run-on",
        type=within(float, 0, 1e6),
        metavar="S",
        help="with --kill-after: seconds the promoted guest runs before the end (default 3; "
        "5 for --guest qemu|libvirt)",
    )
    p.add_argument(
        "--image-dir",
        help=f"--guest qemu|libvirt: the guest image, built there first if missing "
        f"({IMAGE_DIR_HELP})",
    )
    json_flag(p, "print the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the hosts' files (logs, stats)")


def demo_config(args: argparse.Namespace) -> Config:
    from dataclasses import replace

    from mirror.config import Config, load

    base = load(args.config) if args.config else Config()
    g = base.guest
    guest = replace(
        g,
        ram_mib=args.ram_mib or g.ram_mib,
        dirty_pages_per_s=g.dirty_pages_per_s if args.dirty_rate is None else args.dirty_rate,
        outputs_per_s=args.outputs_per_s or g.outputs_per_s,
        shape=args.shape or g.shape,
    )
    ck = replace(
        base.checkpoint,
        epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
        scan=args.scan or base.checkpoint.scan,
    )
    return replace(base, guest=guest, checkpoint=ck)


def build_image(args: argparse.Namespace) -> int:
    from mirror.guests import image

    image.build(_image_dir(args.dir))
    return output.OK


def held(result: dict[str, Any], kill_after: float | None) -> str | None:
    """Why the synthetic demo did not hold (None: it did): its observer saw outputs
    lost, repeated or from two sources at once, or a killed primary was not followed by
    a promotion."""
    why = []
    if result.get("observer_gaps"):
        why.append(f"{result['observer_gaps']} outputs lost (gaps)")
    if result.get("observer_duplicates"):
        why.append(f"{result['observer_duplicates']} outputs repeated")
    if result.get("observer_interleaved"):
        why.append("outputs from two sources interleaved")
    if kill_after is not None and "failover_ms" not in result:
        why.append("the secondary did not promote after the kill")
    return "; ".join(why) or None


def run(args: argparse.Namespace) -> int:
    """`mirror demo`: 0 the demo held, 1 it did not (synthetic: see `held`; qemu,
    libvirt: the client's connection did not survive)."""
    if args.live and args.guest != "libvirt":
        return output.error("--live is for --guest libvirt (a libvirt domain paired as it runs)")
    if args.guest in ("qemu", "libvirt"):
        return run_qemu(args)
    from mirror.config import parse_hostport
    from mirror.lab import demo

    if args.observer:
        parse_hostport(args.observer, "--observer")
    result = demo.run(
        demo_config(args),
        duration=args.duration,
        observer=args.observer,
        keep=args.keep,
        quiet=args.json,
        kill_after=args.kill_after,
        run_on=3.0 if args.run_on is None else args.run_on,
    )
    (demo.dump_json if args.json else demo.print_summary)(result)
    why = held(result, args.kill_after)
    if why is None:
        return output.OK
    print(f"mirror: the demo did not hold: {why}", file=sys.stderr)
    return output.FAILED


def qemu_base(args: argparse.Namespace, default: Config) -> Config:
    """The qemu and libvirt demos' configuration: ``--config``'s (else ``default``, the
    demo's own: 128 MiB), with the options given over it (``--ram-mib`` over its
    ``[guest] ram_mib``)."""
    from dataclasses import replace

    from mirror.config import load

    base = load(args.config) if args.config else default
    return replace(
        base,
        guest=replace(base.guest, ram_mib=args.ram_mib or base.guest.ram_mib),
        checkpoint=replace(
            base.checkpoint,
            epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
            scan=args.scan or base.checkpoint.scan,
        ),
    )


def run_qemu(args: argparse.Namespace) -> int:
    """`mirror demo --guest qemu|libvirt`."""
    from mirror.lab import libvirtdemo, qemudemo

    libvirt = args.guest == "libvirt"
    base = qemu_base(args, libvirtdemo.default_base() if libvirt else qemudemo.default_base())
    r = qemudemo.run(
        base,
        guest=libvirtdemo.LibvirtDemoGuest(operator=True, live=args.live) if libvirt else None,
        image_dir=_image_dir(args.image_dir),
        kill_after=args.kill_after or 5.0,
        run_on=5.0 if args.run_on is None else args.run_on,
        keep=args.keep,
        quiet=args.json,
    )
    (qemudemo.dump_json if args.json else qemudemo.print_summary)(r)
    if libvirt and not args.json:
        libvirtdemo.print_libvirt(r)
    return output.OK if r["connection_survived"] else output.FAILED
