"""What this host offers labkit: KVM and its flavour, Unicorn, Capstone, binutils, the C trap replay.

``labkit doctor`` prints it; ``labkit.viz.capability_table`` shows it in a
notebook.  It sits above the backends (it asks them) and below everything that
shows it, so the figures need not import the command line.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess
from typing import Any

FLAVOURS = {
    "kvm_intel": "Intel VT-x: guest code runs on the CPU; privileged operations exit to KVM.",
    "kvm_amd": "AMD-V (SVM): guest code runs on the CPU; privileged operations exit to KVM.",
    "kvm_pvm": ("PVM, a software hypervisor inside KVM that needs no VT-x/AMD-V (a cloud VM without nested "
                "virtualization): 64-bit ring-3 guest code runs natively, ring-0 and real-mode guest code "
                "is run by KVM's instruction emulator (about 1 µs per instruction)."),
}


def doctor_report() -> dict[str, Any]:
    """What ``labkit doctor`` reports, as a dict (``labkit doctor --json``)."""
    from labkit.backend import choose_backend
    from labkit.kvm.system import probe

    kvm = probe()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "labkit": __import__("labkit").__version__,
        "kvm": {key: value for key, value in dataclasses.asdict(kvm).items()},
        "unicorn": _version("unicorn"),
        "capstone": _version("capstone"),
        "binutils": _binutils(),
        "trap_replay": trap_replay_status(),
    }
    report["kvm"]["explanation"] = FLAVOURS.get(kvm.flavour, "")
    choice = choose_backend("auto")
    report["auto"] = {"backend": choice.name, "reason": choice.reason}
    fixes = []
    if kvm.problem:
        fixes.append(kvm.problem)
    if report["unicorn"] is None:
        fixes.append("Unicorn is missing: pip install 'unicorn==2.1.4' (or reinstall labkit)")
    if report["capstone"] is None:
        fixes.append("Capstone is missing: pip install capstone")
    if report["binutils"] is None:
        fixes.append("GNU binutils (as, ld) is missing, so Guest.from_asm cannot assemble: "
                     "sudo apt-get install binutils (conda: conda install binutils); shipped guests still run")
    if report["trap_replay"].startswith("Python only") and "LABKIT_NATIVE" not in report["trap_replay"]:
        fixes.append("the emulator delivers guest exceptions in Python, about 7x slower per trap: install a C "
                     "compiler (sudo apt-get install gcc; conda: conda install c-compiler)")
    report["fixes"] = fixes
    return report


def trap_replay_status() -> str:
    """How the emulator delivers guest exceptions here: the C trap replay, or Python only (and why)."""
    from labkit.emu.native import status

    return status()


def _version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except ImportError:
        return None
    return getattr(imported, "__version__", "unknown")


def _binutils() -> str | None:
    if shutil.which("as") is None:
        return None
    try:
        out = subprocess.run(["as", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else "unknown"
