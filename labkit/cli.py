"""The ``labkit`` command: ``doctor``, ``guests``, ``run``, ``lab``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from labkit.doctor import FLAVOURS, doctor_report, trap_replay_status  # noqa: F401 (their old home)
from labkit.errors import LabkitError


def cmd_doctor(args) -> int:
    report = doctor_report()
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
        print(f"  {'meaning':<12} {kvm['explanation']}")
    print(f"Unicorn        {report['unicorn'] or 'missing'}")
    print(f"Capstone       {report['capstone'] or 'missing'}")
    print(f"binutils       {report['binutils'] or 'missing'}")
    print(f"trap delivery  {report['trap_replay']}")
    print()
    print(f"backend='auto' picks {report['auto']['backend']}: {report['auto']['reason']}")
    if report["fixes"]:
        print()
        print("To fix:")
        for fix in report["fixes"]:
            print(f"  - {fix}")
    return 0


def cmd_guests(args) -> int:
    from labkit.guest import list_guests

    guests = [_plain(guest) for guest in list_guests()]
    if args.json:
        print(json.dumps(guests, indent=2))
        return 0
    width = max((len(g["name"]) for g in guests), default=4)
    for guest in guests:
        print(f"{guest['name']:<{width}}  {guest['mode']:>2}-bit  {guest.get('description', '')}")
    return 0


def _plain(item) -> dict:
    if dataclasses.is_dataclass(item):
        return dataclasses.asdict(item)
    return dict(item)


def _load_guest(spec: str, mode: int | None):
    from labkit.guest import Guest

    if os.path.exists(spec) or Path(spec).suffix:
        return Guest.from_file(spec, mode=mode)
    return Guest.named(spec)


def cmd_run(args) -> int:
    from labkit.vmm.machine import Machine

    guest = _load_guest(args.guest, args.mode)
    with Machine(guest, backend=args.backend, memory=args.memory) as machine:
        result = machine.run(timeout=args.timeout)
        backend = machine.backend
        reason = machine.backend_reason
    if args.json:
        print(json.dumps({
            "guest": guest.name,
            "backend": backend,
            "backend_reason": reason,
            "console": result.console,
            "status": result.status.kind,
            "status_text": str(result.status),
            "exit_code": result.status.code,
            "exits": result.exits,
            "regs": result.regs.as_dict(),
            "elapsed_s": result.elapsed_s,
        }, indent=2))
    else:
        sys.stdout.write(result.console)
        if result.console and not result.console.endswith("\n"):
            sys.stdout.write("\n")
        print(f"--- {guest.name} on {backend} ({reason}): {result.status} in {result.elapsed_s * 1e3:.1f} ms")
        print(result.trace.format_table())
    if result.status.kind == "halted":
        return 0
    if result.status.kind == "exited":
        return (result.status.code or 0) & 0xFF
    return 3


def cmd_lab(args) -> int:
    notebooks = Path(args.notebooks)
    if not notebooks.is_dir():
        raise LabkitError(f"no notebooks folder at {notebooks}")
    command = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebooks}", *args.extra]
    if os.geteuid() == 0 and "--allow-root" not in command:
        command.append("--allow-root")  # containers and lab VMs often run as root
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Run tiny x86 guests under KVM or emulation.")
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
    run.add_argument("--memory", type=lambda text: int(text, 0), default=2 << 20, help="guest RAM in bytes")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)

    lab = sub.add_parser("lab", help="start JupyterLab on the notebooks (other options go to jupyter lab)")
    lab.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"))
    lab.set_defaults(func=cmd_lab, extra=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra = unknown  # `labkit lab --port 9999 ...` passes them on to jupyter lab
    try:
        return args.func(args)
    except LabkitError as error:
        print(f"labkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `labkit guests | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
