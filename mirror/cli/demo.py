"""`mirror demo`: a primary and a secondary on this machine, then a summary;
`mirror image build`: the demo guest's kernel and initramfs. The demos (mirror/lab)
are imported by these commands only."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.cli import output
from mirror.cli.args import json_flag, within
from mirror.config import Config, load, parse_hostport
from mirror.guests import image


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("image", help="the demo guest's kernel and initramfs")
    p.add_argument("action", choices=["build"], help="build (or rebuild) the guest image")
    p.add_argument(
        "--dir",
        default=str(image.DEFAULT_DIR),
        help=f"where to put it (default {image.DEFAULT_DIR}, or $MIRROR_IMAGE_DIR)",
    )

    p = sub.add_parser("demo", help="a primary and a secondary on this machine, then a summary")
    p.add_argument(
        "--guest",
        choices=["synthetic", "qemu", "libvirt"],
        default="synthetic",
        help="synthetic (default): a synthetic guest on loopback; qemu: a QEMU guest in "
        "network namespaces whose client's TCP connection survives the kill of its host "
        "(needs root); libvirt: the same with a libvirt domain (each host runs its own "
        "libvirtd)",
    )
    p.add_argument("--config", help="base configuration (TOML); the options below override it")
    p.add_argument(
        "--ram-mib",
        type=within(int, 1, 1 << 20),
        help="guest RAM (default 256; 128 for --guest qemu)",
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
        default=3.0,
        metavar="S",
        help="with --kill-after: seconds the promoted guest runs before the end (default 3)",
    )
    p.add_argument(
        "--image-dir",
        default=str(image.DEFAULT_DIR),
        help="--guest qemu: the guest image (built there first if missing)",
    )
    json_flag(p, "print the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the hosts' files (logs, stats)")


def demo_config(args: argparse.Namespace) -> Config:
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
    image.build(Path(args.dir))
    return output.OK


def run(args: argparse.Namespace) -> int:
    """`mirror demo`: 0 done (--guest qemu|libvirt: the client's connection survived,
    else 1)."""
    if args.guest in ("qemu", "libvirt"):
        return run_qemu(args)
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
        run_on=args.run_on,
    )
    (demo.dump_json if args.json else demo.print_summary)(result)
    return output.OK


def run_qemu(args: argparse.Namespace) -> int:
    """`mirror demo --guest qemu|libvirt`."""
    from mirror.lab import libvirtdemo, qemudemo

    libvirt = args.guest == "libvirt"
    default = libvirtdemo.default_base() if libvirt else qemudemo.default_base()
    base = load(args.config) if args.config else default
    base = replace(
        base,
        guest=replace(base.guest, ram_mib=args.ram_mib or 128),
        checkpoint=replace(
            base.checkpoint,
            epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
            scan=args.scan or base.checkpoint.scan,
        ),
    )
    r = qemudemo.run(
        base,
        guest=libvirtdemo.LibvirtDemoGuest() if libvirt else None,
        image_dir=Path(args.image_dir),
        kill_after=args.kill_after or 5.0,
        run_on=args.run_on if args.run_on != 3.0 else 5.0,
        keep=args.keep,
        quiet=args.json,
    )
    (qemudemo.dump_json if args.json else qemudemo.print_summary)(r)
    if libvirt and not args.json:
        libvirtdemo.print_libvirt(r)
    return output.OK if r["connection_survived"] else output.FAILED
