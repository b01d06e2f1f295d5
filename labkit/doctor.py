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
    "kvm_intel": ("Intel VT-x: the guest runs on the CPU in VMX non-root operation, in its own rings 0-3; "
                  "what KVM chose to intercept (port I/O, HLT, ...) and a few instructions that always exit (CPUID) "
                  "cause VM exits."),
    "kvm_amd": ("AMD-V (SVM): the guest runs on the CPU in guest mode, in its own rings 0-3; what KVM chose to "
                "intercept (port I/O, HLT, CPUID, ...) causes a VM exit."),
    "kvm_pvm": ("PVM, a software hypervisor inside KVM that needs no VT-x/AMD-V (a cloud VM without nested "
                "virtualization). A PVM-aware guest kernel runs natively in hardware ring 3; labkit's guests are "
                "not PVM-aware: their 64-bit ring-3 code runs natively, their ring-0 and real-mode code is run by "
                "KVM's instruction emulator (about 1 µs per instruction on the PVM host labkit was measured on). "
                "Ring-3 SGDT/SMSW are trapped by the host's UMIP and emulated by KVM with the guest's values."),
}
"""What ``labkit doctor`` says about each KVM module (DESIGN's PVM facts; Intel SDM vol. 3C ch. 24-25 for VMX)."""


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
