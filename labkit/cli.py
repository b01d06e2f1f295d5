"""The ``labkit`` command: ``doctor``, ``guests``, ``run``, ``run-many``, ``lab``, ``demo``, ``snapshot``, ``disk``."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import json
import os
import re
import resource
import secrets
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from labkit.doctor import FLAVOURS, doctor_report, trap_replay_status  # noqa: F401 (their old home)
from labkit.errors import ConfigError, LabkitError

if TYPE_CHECKING:  # imported where used: `labkit doctor` stays fast
    from labkit.guest import Guest
    from labkit.table import Table


def cmd_doctor(args: argparse.Namespace) -> int:
    from labkit.virtio.native import status as virtio_drain_status

    report = doctor_report()
    report["virtio_drain"] = virtio_drain_status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    kvm = report["kvm"]
    print(f"labkit {report['labkit']} on Python {report['python']}")
    print()
    print(f"/dev/kvm       {'usable' if kvm['usable'] else 'NOT usable'}"
          + (f" (API version {kvm['api_version']})" if kvm.get("api_version") else ""))
    for key in ("device", "permissions", "flavour"):
        if kvm.get(key) is not None:
            print(f"  {key:<12} {kvm[key]}")
    if kvm["explanation"]:
        print(textwrap.fill(kvm["explanation"], 96, initial_indent=f"  {'meaning':<12} ", subsequent_indent=" " * 15))
    print(f"Unicorn        {report['unicorn'] or 'missing'}")
    print(f"Capstone       {report['capstone'] or 'missing'}")
    print(f"binutils       {report['binutils'] or 'missing'}")
    print(f"trap delivery  {report['trap_replay']}")
    print(f"virtio drain   {report['virtio_drain']}")
    print()
    print(f"backend='auto' picks {report['auto']['backend']}: {report['auto']['reason']}")
    if report["fixes"]:
        print()
        print("To fix:")
        for fix in report["fixes"]:
            print(f"  - {fix}")
    return 0


def cmd_guests(args: argparse.Namespace) -> int:
    from labkit.guest import list_guests

    guests = [_plain(guest) for guest in list_guests()]
    if args.json:
        print(json.dumps(guests, indent=2))
        return 0
    width = max((len(g["name"]) for g in guests), default=4)
    for guest in guests:
        print(f"{guest['name']:<{width}}  {guest['mode']:>2}-bit  {guest.get('description', '')}")
    return 0


def _plain(item: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return dict(item)


def _load_guest(spec: str, mode: int | None) -> Guest:
    from labkit.guest import Guest

    if os.path.exists(spec) or Path(spec).suffix:
        return Guest.from_file(spec, mode=mode)
    return Guest.named(spec)


VMCS_PRESETS = {"none": "nothing exits", "kvm-like": "KVM-like (EPT)", "shadow-paging": "KVM-like, shadow paging",
                "every-exit": "every exit"}
"""``labkit run --vmcs`` -> a name of labkit.monitor.vmx.PRESETS."""


def cmd_run(args: argparse.Namespace) -> int:
    from labkit.vmm.machine import Machine

    guest = _load_guest(args.guest, args.mode)
    if args.monitor is not None or args.vmcs is not None:
        return _run_under_monitor(args, guest)
    with Machine(guest, backend=args.backend, memory=args.memory) as machine:
        result = machine.run(timeout=args.timeout)
        backend = machine.backend
        reason = machine.backend_reason
    return _print_run(args, guest, result, backend, reason)


def _run_under_monitor(args: argparse.Namespace, guest: Guest) -> int:
    """``labkit run GUEST --monitor te|bt|pv|vmx [--vmcs PRESET]``: the run and its hypervisor entry table."""
    from labkit.backend import choose_backend
    from labkit.monitor.techniques import MONITORS, PARAVIRTUAL_KERNEL, entry_table, run_technique

    if args.monitor is None:
        raise ConfigError("--vmcs sets up the VMX model: give --monitor vmx with it")
    if args.vmcs is not None and args.monitor != "vmx":
        raise ConfigError(f"--vmcs belongs to the VMX model (--monitor vmx), not to --monitor {args.monitor}")
    if guest.mode != 64:
        raise ConfigError(f"--monitor runs 64-bit kernels; {guest.name} starts in {guest.mode}-bit mode")
    if args.monitor == "pv" and guest.name != PARAVIRTUAL_KERNEL:
        raise ConfigError(f"--monitor pv runs a kernel written for the hypercall ABI; {guest.name} is not one "
                          f"(try: labkit run {PARAVIRTUAL_KERNEL} --monitor pv)")
    if args.monitor != "pv" and guest.name == PARAVIRTUAL_KERNEL:
        raise ConfigError(f"{PARAVIRTUAL_KERNEL} is paravirtual (it calls the hypervisor instead of trapping): "
                          f"run it with --monitor pv")
    choice = choose_backend(args.backend)
    options: dict[str, Any] = {"memory": args.memory}
    if args.monitor == "vmx":
        from labkit.monitor.vmx import PRESETS

        options["vmcs"] = PRESETS[VMCS_PRESETS[args.vmcs or "kvm-like"]]()
    kernel = None if args.monitor == "pv" else guest
    native = guest.expected.get("console")  # a shipped kernel's native console, to compare with
    result, row = run_technique(args.monitor, kernel, choice.name, args.timeout, native=native, **options)
    technique = MONITORS[args.monitor]
    table = entry_table([row], f"{guest.name} under {technique}: hypervisor entries")
    extra = None
    if args.monitor == "vmx":
        from labkit.monitor.vmx.model import exit_table

        extra = exit_table(result)
    if args.json:
        monitor = {"technique": technique, "entry_kind": row.entry_kind, "entries": row.entries,
                   "by_kind": row.by_kind, "counted_by": row.measured_by}
        if args.monitor == "vmx":
            report = result.monitor
            monitor["vmcs_preset"] = args.vmcs or "kvm-like"
            monitor["vm_exits"] = [{"reason": int(exit.reason), "name": exit.reason.sdm_name,
                                    "qualification": exit.qualification, "fields": exit.fields,
                                    "guest_rip": exit.guest_rip, "instruction": exit.instruction}
                                   for exit in getattr(report, "exits", ())]
        return _print_run(args, guest, result, choice.name, choice.reason, monitor=monitor)
    return _print_run(args, guest, result, choice.name, choice.reason, tables=[table] + ([extra] if extra else []))


def _print_run(args: argparse.Namespace, guest: Guest, result: Any, backend: str, reason: str, *,
               monitor: dict[str, Any] | None = None, tables: Sequence[Table] = ()) -> int:
    dropped = getattr(result, "console_dropped", 0) or 0  # RunResult.console_dropped: bytes past the console bound
    if args.json:
        print(json.dumps({
            "guest": guest.name,
            "backend": backend,
            "backend_reason": reason,
            "console": result.console,
            "console_dropped": dropped,
            "status": result.status.kind,
            "status_text": str(result.status),
            "exit_code": result.status.code,
            "exits": result.trace.by_kind()[0],
            "labkit_events": result.trace.by_kind()[1],
            "exit_table": result.trace.table_json(),
            "regs": result.regs.as_dict(),
            "elapsed_s": result.elapsed_s,
            **({"monitor": monitor} if monitor is not None else {}),
        }, indent=2, default=str))
    else:
        sys.stdout.write(result.console)
        if result.console and not result.console.endswith("\n"):
            sys.stdout.write("\n")
        if dropped:
            print(f"[console truncated: {dropped} bytes dropped]")
        print(f"--- {guest.name} on {backend} ({reason}): {result.status} in {result.elapsed_s * 1e3:.1f} ms")
        for table in tables:
            print(table)
            print()
        print(result.trace.format_table())
    if result.status.kind == "halted":
        return 0
    if result.status.kind == "exited":
        return (result.status.code or 0) & 0xFF
    return 3


def cmd_run_many(args: argparse.Namespace) -> int:
    """Run several guests at once (``labkit.fleet.run_many``) and print each one's outcome as it ends."""
    from labkit.errors import LimitError
    from labkit.fleet import FleetLimits, VmSpec, run_many

    specs: list[VmSpec] = []
    for item in args.guests:
        spec, _, count_text = item.rpartition("*") if "*" in item else (item, "", "1")
        if not count_text.isdigit() or int(count_text) < 1:
            raise ConfigError(f"{item!r}: write GUEST or GUEST*COUNT with a positive COUNT")
        guest = _load_guest(spec, args.mode)
        for _ in range(int(count_text)):
            specs.append(VmSpec(f"{guest.name}-{len(specs)}", guest, backend=args.backend, memory=args.memory))
    limits = FleetLimits(**{name: value for name, value in (("max_vms", args.max_vms),
                                                            ("memory_total", args.memory_total)) if value})
    try:
        outcomes = run_many(specs, max_parallel=args.max_parallel, timeout=args.timeout, limits=limits)
    except LimitError as error:
        raise LimitError(f"{error} (here: --max-vms, --memory-total, --max-parallel)") from None
    failed = 0
    rows: list[dict[str, Any]] = []
    for outcome in outcomes:
        failed += outcome.status.value not in ("halted", "exited")
        row = {"name": outcome.name, "backend": outcome.backend, "status": outcome.status.value,
               "reason": outcome.reason, "started_s": round(outcome.started_s, 4),
               "ended_s": round(outcome.ended_s, 4), "console": outcome.console,
               "console_dropped": outcome.console_dropped, "trace_dropped": outcome.trace_dropped,
               "exit_code": outcome.result.status.code if outcome.result is not None else None}
        rows.append(row)
        if not args.json:
            console = outcome.console.strip().replace("\n", " | ")
            print(f"{outcome.name:24} {outcome.backend:4} {outcome.status.value:9} "
                  f"{outcome.started_s:7.3f}-{outcome.ended_s:7.3f} s  {outcome.reason:.60}"
                  + (f"  [{console:.40}]" if console else ""), flush=True)
    if args.json:
        print(json.dumps({"vms": rows}, indent=2))
    else:
        print(f"--- {len(rows)} VMs, {len(rows) - failed} halted or exited, {failed} did not")
    return 0 if failed == 0 else 3


TOKEN_OPTIONS = ("--IdentityProvider.token", "--ServerApp.token", "--NotebookApp.token")


def cmd_lab(args: argparse.Namespace) -> int:
    """Become JupyterLab (``exec``), so every signal reaches it and nothing is left behind; never without a token.

    Without a token option labkit makes one (``secrets``) and hands it over in
    ``JUPYTER_TOKEN`` (not the command line, which other users can read with
    ``ps``), then prints the URL that carries it.
    """
    notebooks = Path(args.notebooks)
    if not notebooks.is_dir():
        raise LabkitError(f"no notebooks folder at {notebooks}")
    if importlib.util.find_spec("jupyterlab") is None:
        raise LabkitError("JupyterLab is not installed: pip install jupyterlab (or run scripts/setup lab)")
    extra = list(args.extra)
    given = _option_value(extra, TOKEN_OPTIONS)
    if given is not None and not given.strip():
        raise ConfigError("an empty token would let anyone who reaches the port run code as you: "
                          "give a token, or leave the option out and labkit makes one")
    env = dict(os.environ)
    token = given or env.get("JUPYTER_TOKEN") or secrets.token_urlsafe(24)
    env["JUPYTER_TOKEN"] = token
    command = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebooks}", *extra]
    if os.geteuid() == 0 and "--allow-root" not in command:
        command.append("--allow-root")  # containers and lab VMs often run as root
    host = _option_value(extra, ("--ip", "--ServerApp.ip")) or "localhost"
    port = _option_value(extra, ("--port", "--ServerApp.port")) or env.get("JUPYTER_PORT") or "8888"
    print(f"labkit: JupyterLab on {notebooks}: http://{host}:{port}/lab?token={token}\n"
          "labkit: (if that port is taken JupyterLab picks another and prints its own URL)", flush=True)
    sys.stderr.flush()
    try:
        os.execve(sys.executable, command, env)
    except OSError as error:
        raise LabkitError(f"cannot start JupyterLab ({sys.executable} -m jupyterlab): {error.strerror}") from None
    return 1  # not reached: exec does not return


def cmd_demo(args: argparse.Namespace) -> int:
    """Become Voila (``exec``) serving the instructor's live view (``labkit/widgets/live.ipynb``) as a page.

    Bound to 127.0.0.1 unless ``--ip`` says otherwise, and always behind a token
    (``--token``: Voila's login takes the one labkit makes and hands over in
    ``JUPYTER_TOKEN``, never on the command line, which other users can read with
    ``ps``).  As with ``labkit lab``, labkit becomes the server: stopping it stops its kernel.
    """
    from labkit.guest import Guest

    if importlib.util.find_spec("voila") is None:
        raise LabkitError("Voila is not installed: pip install 'labkit[classroom]' (or run scripts/setup classroom)")
    Guest.named(args.guest)  # an unknown guest is a one-line error here, not a traceback on the page
    if args.bytes <= 0:
        raise ConfigError(f"--bytes must be positive, not {args.bytes}")
    page = Path(__file__).resolve().parent / "widgets" / "live.ipynb"
    env = dict(os.environ)
    token = env.get("JUPYTER_TOKEN") or secrets.token_urlsafe(24)
    env.update(JUPYTER_TOKEN=token, LABKIT_DEMO_GUEST=args.guest, LABKIT_DEMO_BACKEND=args.backend,
               LABKIT_DEMO_BYTES=str(args.bytes))
    command = [sys.executable, "-m", "voila", str(page), "--no-browser", "--token", f"--port={args.port}",
               f"--Voila.ip={args.ip}"]
    print(f"labkit: the live view of {args.guest}: http://{args.ip}:{args.port}/?token={token}", flush=True)
    sys.stderr.flush()
    try:
        os.execve(sys.executable, command, env)
    except OSError as error:
        raise LabkitError(f"cannot start Voila ({sys.executable} -m voila): {error.strerror}") from None
    return 1  # not reached: exec does not return


def _option_value(options: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` in ``options`` (``--name=value`` or ``--name value``), or None."""
    value = None
    for index, option in enumerate(options):
        for name in names:
            if option.startswith(name + "="):
                value = option[len(name) + 1:]
            elif option == name and index + 1 < len(options):
                value = options[index + 1]
    return value


_SIZE = re.compile(r"(0x[0-9a-f]+|[0-9]+)\s*(?:([kmg])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def cmd_disk_create(args: argparse.Namespace) -> int:
    from labkit.storage import Qcow2Image, RawImage, create_overlay

    if args.format == "raw":
        if args.backing or args.size is None:
            raise ConfigError("a raw image takes a size and no backing file")
        RawImage.create(args.file, args.size).close()
    elif args.backing:
        create_overlay(args.file, args.backing, cluster_size=args.cluster_size, size=args.size)
    else:
        if args.size is None:
            raise ConfigError("give a size (64M, 1G, ...) or a backing file (-b)")
        Qcow2Image.create(args.file, args.size, cluster_size=args.cluster_size)
    print(f"Formatting '{args.file}', fmt={args.format} size={args.size if args.size is not None else 'of the backing file'}")
    return 0


def cmd_disk_info(args: argparse.Namespace) -> int:
    from labkit.storage import info

    report = info(args.file, format=args.format)
    if args.output == "json":
        print(json.dumps(report, indent=4))
        return 0
    print(f"image: {report['filename']}")
    print(f"file format: {report['format']}")
    print(f"virtual size: {report['virtual-size']} bytes")
    print(f"disk size: {report['actual-size']} bytes")
    if "cluster-size" in report:
        print(f"cluster_size: {report['cluster-size']}")
    if "backing-filename" in report:
        print(f"backing file: {report['backing-filename']}")
        print(f"backing file format: {report.get('backing-filename-format', 'probed')}")
    return 0


def cmd_disk_check(args: argparse.Namespace) -> int:
    """Exit codes as ``qemu-img check``: 0 clean, 1 not completed, 2 corrupt, 3 leaked clusters only."""
    from labkit.storage import check_image

    report = check_image(args.file, repair=args.repair == "leaks", format=args.format)
    if args.output == "json":
        print(json.dumps(report.as_json(), indent=4))
        return report.exit_code
    if report.error is not None:
        print(f"labkit: error: {report.error}", file=sys.stderr)
        return report.exit_code
    for line in report.corruptions:
        print(f"ERROR {line}")
    for line in report.leaks:
        print(f"Leaked cluster: {line}")
    if report.leaks_fixed:
        print(f"{report.leaks_fixed} leaked clusters were repaired.")
    if report.corruptions:
        print(f"\n{len(report.corruptions)} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    if report.leaks:
        print(f"\n{len(report.leaks)} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data (repair: labkit disk check -r leaks).")
    if not report.corruptions and not report.leaks:
        print("No errors were found on the image.")
    if report.format == "qcow2" and report.total_clusters:
        print(f"{report.allocated_clusters}/{report.total_clusters} = "
              f"{100 * report.allocated_clusters / report.total_clusters:.2f}% allocated")
        print(f"Image end offset: {report.image_end_offset}")
    return report.exit_code


def cmd_disk_commit(args: argparse.Namespace) -> int:
    from labkit.storage import commit

    copied = commit(args.file, empty=not args.keep)
    print(f"Image committed ({copied} bytes copied into its backing file).")
    return 0


def cmd_disk_map(args: argparse.Namespace) -> int:
    from labkit.storage import open_image

    image = open_image(args.file, format=args.format)
    try:
        extents = image.extents()
    finally:
        image.close()
    if args.output == "json":
        rows = [{"start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero,
                 "data": e.data, **({"offset": e.offset} if e.offset is not None else {})} for e in extents]
        print(json.dumps(rows, indent=4))
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{e.start:<#20x}{e.length:<#20x}{e.offset:<#20x}{e.filename}")
    return 0


def _add_disk_parser(sub: Any) -> None:
    disk = sub.add_parser("disk", help="disk images: create, info, check, commit, map (raw and qcow2)")
    verbs = disk.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="a new raw or qcow2 image, or a qcow2 overlay (-b)")
    create.add_argument("-f", "--format", choices=("qcow2", "raw"), default="qcow2")
    create.add_argument("-b", "--backing", help="backing file (its name is stored relative to the new image)")
    create.add_argument("--cluster-size", type=memory_size, default=65536, help="qcow2 cluster size (default 64K)")
    create.add_argument("file")
    create.add_argument("size", type=memory_size, nargs="?", help="virtual size (64M, 1G; default: the backing's)")
    create.set_defaults(func=cmd_disk_create)
    info = verbs.add_parser("info", help="what qemu-img info says (--output json: the same keys)")
    info.add_argument("--output", choices=("human", "json"), default="human")
    info.add_argument("-f", "--format", choices=("qcow2", "raw"), help="the image's format (default: probed)")
    info.add_argument("file")
    info.set_defaults(func=cmd_disk_info)
    check = verbs.add_parser("check", help="check the metadata",
                             description="Exit status as qemu-img check: 0 clean, 1 check not completed, "
                                         "2 corruptions, 3 leaked clusters only.")
    check.add_argument("--output", choices=("human", "json"), default="human")
    check.add_argument("-r", "--repair", choices=("leaks",), help="repair leaked clusters")
    check.add_argument("-f", "--format", choices=("qcow2", "raw"), help="the image's format (default: probed)")
    check.add_argument("file")
    check.set_defaults(func=cmd_disk_check)
    commit = verbs.add_parser("commit", help="copy an overlay into its backing file and empty it")
    commit.add_argument("-d", "--keep", action="store_true", help="do not empty the overlay")
    commit.add_argument("file")
    commit.set_defaults(func=cmd_disk_commit)
    map_ = verbs.add_parser("map", help="where each range of the virtual disk is stored, down the chain")
    map_.add_argument("--output", choices=("human", "json"), default="human")
    map_.add_argument("-f", "--format", choices=("qcow2", "raw"), help="the image's format (default: probed)")
    map_.add_argument("file")
    map_.set_defaults(func=cmd_disk_map)


def memory_size(text: str) -> int:
    """``--memory``: bytes (``2097152``, ``0x200000``) or binary units (``2M``, ``64MiB``, ``512K``, ``1G``)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes (2097152, 0x200000) "
                                         "or a number with a unit (2M, 64MiB, 1G)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1), 0) * _UNITS[unit]


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``labkit snapshot info|check FILE``: exit 0 for a good file, 2 for a corrupt one, 1 for one that cannot be read."""
    from labkit.errors import SnapshotError
    from labkit.snapshot.file import SnapshotFile

    if not os.access(args.file, os.R_OK):
        print(f"labkit: error: cannot read snapshot {args.file}: "
              f"{'no such file' if not os.path.exists(args.file) else 'permission denied'}", file=sys.stderr)
        return 1
    try:
        with SnapshotFile(args.file) as snapshot:
            header = snapshot.header
            if args.action == "check":
                snapshot.verify()
    except SnapshotError as error:
        print(f"labkit: corrupt snapshot: {error}", file=sys.stderr)
        return 2
    info = {"file": args.file, "version": header.version, "kind": header.kind.name.lower(),
            "snapshot_id": header.snapshot_id.hex(), "parent_id": header.parent_id.hex() if header.is_diff else None,
            "size": header.file_size,
            "sections": [{"name": section.name, "offset": section.offset, "length": section.length,
                          "crc32": f"{section.crc32:08x}"} for section in header.sections]}
    if args.action == "check":
        info["check"] = "every checksum matches"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.file}: labkit snapshot version {header.version}, {info['kind']}, {header.file_size} bytes")
    print(f"  id      {info['snapshot_id']}")
    if header.is_diff:
        print(f"  parent  {info['parent_id']}")
    print(f"  {'section':<16} {'offset':>12} {'length':>12}  crc32")
    for section in header.sections:
        print(f"  {section.name:<16} {section.offset:>12} {section.length:>12}  {section.crc32:08x}")
    if args.action == "check":
        print("check: every section's checksum matches")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``labkit run: error: ... (see labkit run --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="labkit", description="Run tiny x86 guests under KVM or emulation.")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="what this machine offers: KVM, its flavour, Unicorn, binutils")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    guests = sub.add_parser("guests", help="list the shipped guests")
    guests.add_argument("--json", action="store_true")
    guests.set_defaults(func=cmd_guests)

    run = sub.add_parser("run", help="run a guest and show its console and exits",
                         description="Exit status: 0 halted, the guest's code when it exited through the "
                                     "debug-exit port, 3 for a fault, triple fault, timeout or error.")
    run.add_argument("guest", help="a shipped guest's name, or a FILE.S / FILE.bin")
    run.add_argument("--backend", choices=("auto", "kvm", "emu"), default="auto")
    run.add_argument("--mode", type=int, choices=(16, 32, 64), default=None,
                     help="the mode a FILE starts in (default: from its metadata, else 64)")
    run.add_argument("--timeout", type=float, default=5.0, help="seconds before the guest is stopped")
    run.add_argument("--memory", type=memory_size, default=2 << 20,
                     help="guest RAM: bytes, or with a binary unit (2M, 64MiB, 1G); default 2M")
    run.add_argument("--monitor", choices=("te", "bt", "pv", "vmx"), default=None,
                     help="run a kernel under a technique: te trap-and-emulate, bt binary translation, "
                          "pv paravirtual (pvkernel64), vmx a model of VMX; prints its hypervisor entries")
    run.add_argument("--vmcs", choices=tuple(VMCS_PRESETS), default=None,
                     help="the VMX model's VMCS set-up (with --monitor vmx; default kvm-like)")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)

    many = sub.add_parser("run-many", help="run several guests at once and show each one's outcome as it ends",
                          description="GUEST is a shipped guest's name or a FILE, GUEST*N runs N copies. "
                                      "Exit status: 0 when every VM halted or exited, 3 otherwise.")
    many.add_argument("guests", nargs="+", metavar="GUEST[*N]")
    many.add_argument("--backend", choices=("auto", "kvm", "emu"), default="auto")
    many.add_argument("--mode", type=int, choices=(16, 32, 64), default=None,
                      help="the mode a FILE starts in (default: from its metadata, else 64)")
    many.add_argument("--timeout", type=float, default=5.0, help="each VM's run budget in seconds")
    many.add_argument("--max-parallel", type=int, default=None, help="VMs running at once (default: all, up to 64)")
    many.add_argument("--memory", type=memory_size, default=2 << 20, help="each VM's RAM (default 2M)")
    many.add_argument("--max-vms", type=int, default=None, help="raise the limit on VMs (default 256)")
    many.add_argument("--memory-total", type=memory_size, default=None,
                      help="raise the limit on the RAM of the VMs running at once (default 2G)")
    many.add_argument("--json", action="store_true")
    many.set_defaults(func=cmd_run_many)

    lab = sub.add_parser("lab", help="start JupyterLab on the notebooks (other options go to jupyter lab)")
    lab.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"))
    lab.set_defaults(func=cmd_lab, extra=[])

    demo = sub.add_parser("demo", help="serve the instructor's live view as a page (Voila), for a projector")
    demo.add_argument("--guest", default="uart_console64", help="the guest to run (default: uart_console64)")
    demo.add_argument("--backend", default="auto", choices=("auto", "kvm", "emu"))
    demo.add_argument("--bytes", type=int, default=64 * 1024, help="what uart_console64 writes (default 64 KiB)")
    demo.add_argument("--port", type=int, default=8866)
    demo.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: this machine only)")
    demo.set_defaults(func=cmd_demo)

    snapshot = sub.add_parser("snapshot", help="show or check a snapshot file",
                              description="Exit status: 0 good, 2 corrupt, 1 cannot be read.")
    snapshot.add_argument("action", choices=("info", "check"),
                          help="info: header and sections (header and table checked); check: every checksum too")
    snapshot.add_argument("file")
    snapshot.add_argument("--json", action="store_true")
    snapshot.set_defaults(func=cmd_snapshot)
    _add_disk_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra = unknown  # `labkit lab --port 9999 ...` passes them on to jupyter lab
    try:
        return args.func(args)
    except BrokenPipeError:  # `labkit guests | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LabkitError, OSError) as error:  # an OSError here is one no layer below translated
        print(f"labkit: error: {_describe(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130


def _describe(error: BaseException) -> str:
    """The error's message, or, when it came from running out of file descriptors, that instead.

    Out of descriptors, opening a guest file, /dev/kvm or a pipe fails with
    EMFILE/ENFILE and each layer would blame its own thing; the chain of
    causes says what really happened.
    """
    cause: BaseException | None = error
    while cause is not None:
        number = getattr(cause, "errno", None)
        if number == errno.EMFILE:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return (f"too many open files: this process may have {soft} open at once (ulimit -n) and has used "
                    f"them all; close some or raise the limit (`ulimit -n 4096`) [{_one_line(error)}]")
        if number == errno.ENFILE:
            return f"too many open files in the whole system (ENFILE): the kernel's file table is full [{_one_line(error)}]"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, OSError) and not isinstance(error, LabkitError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return str(error)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
