"""What measured a figure's data, said in the figure: KVM (which flavour) or the emulator.

A :class:`labkit.RunResult` carries where it ran (``result.origin``); figures
take their label from it, never from the host they are drawn on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from labkit.errors import ConfigError
from labkit.trace import ExitTrace
from labkit.vmm.status import Origin, RunResult

KVM_FLAVOURS = ("kvm_intel", "kvm_amd", "kvm_pvm")

Measured = ExitTrace | RunResult
"""What a figure draws: a run's result (which says where it ran) or a bare trace."""
BackendHint = str | Mapping[str, str] | None
"""What measured a bare trace: ``"kvm"``, ``"emu"``, a KVM module name, or ``Machine.describe()``'s dict."""


@dataclass(frozen=True)
class Source:
    """A trace and the backend that produced it."""

    trace: ExitTrace
    backend: str
    """``"kvm"``, ``"emu"``, ``"fake"`` or a free-form name."""
    flavour: str | None
    guest: str | None = None

    @property
    def label(self) -> str:
        return measured_on(self.backend, self.flavour)

    @property
    def short(self) -> str:
        """``KVM (kvm_pvm)`` or ``emulator (Unicorn)``: for a column heading."""
        if self.backend == "kvm":
            return f"KVM ({self.flavour})" if self.flavour else "KVM"
        if self.backend == "emu":
            return "emulator (Unicorn)"
        return self.backend


def measured_on(backend: str, flavour: str | None = None) -> str:
    """The sentence a figure carries about what measured it.

    >>> measured_on("kvm", "kvm_pvm")
    'measured on KVM (kvm_pvm)'
    >>> measured_on("emu")
    'measured on the emulator (Unicorn): emulator time, not hardware time'
    """
    if backend == "kvm":
        return f"measured on KVM ({flavour})" if flavour else "measured on KVM"
    if backend == "emu":
        return "measured on the emulator (Unicorn): emulator time, not hardware time"
    if backend == "fake":
        return "scripted exits (fake backend): not a measurement"
    return f"measured on {backend}"


def _local_flavour() -> str:
    from labkit.kvm.system import kvm_flavour  # reads /sys/module only; no ioctl

    return kvm_flavour()


def resolve(data: Measured, backend: BackendHint = None, flavour: str | None = None) -> Source:
    """Turn what a figure function was given into a :class:`Source`.

    ``data`` is an :class:`ExitTrace` or a :class:`labkit.RunResult`.  A result
    says where it ran (``result.origin``: backend and KVM flavour), and that is
    what labels the figure, wherever it is drawn.  ``backend`` is ``"kvm"``,
    ``"emu"``, a KVM module name (``"kvm_pvm"``), or ``Machine.describe()``'s
    dict; it is needed for a bare trace, and overrides a result's origin.

    Fallback, only for what carries no origin (a bare trace given
    ``backend="kvm"`` and no flavour, or a result made before results carried
    one): the run is taken to have happened on this host, and this host's KVM
    module names the flavour.
    """
    guest = None
    origin: Origin | None = None
    if isinstance(data, ExitTrace):
        trace = data
    elif isinstance(getattr(data, "trace", None), ExitTrace):
        trace = data.trace
        origin = getattr(data, "origin", None)
        if backend is None and origin is not None:
            backend, flavour = origin.backend, flavour or origin.flavour
        elif backend is None:
            backend = getattr(data, "backend", None)
    else:
        raise ConfigError(f"a figure needs an ExitTrace or a RunResult, not {type(data).__name__}")
    if isinstance(backend, Mapping):
        flavour = flavour or backend.get("flavour")
        guest = backend.get("guest")
        backend = backend.get("backend")
    if backend is None:
        raise ConfigError("say what measured this trace: backend='kvm' or backend='emu' "
                          "(a RunResult carries it; a bare ExitTrace does not)")
    if not isinstance(backend, str):
        raise ConfigError(f"backend must be a name such as 'kvm' or 'emu', not {backend!r}")
    if backend in KVM_FLAVOURS:
        backend, flavour = "kvm", backend
    if backend == "kvm" and flavour is None and origin is None:
        flavour = _local_flavour()
        if flavour == "unknown":
            flavour = None
    return Source(trace, backend, flavour, guest)


def label(result: RunResult) -> str:
    """The sentence a figure carries about ``result``: ``measured on KVM (kvm_pvm)``, from where it ran."""
    return resolve(result).label


def short_label(result: RunResult) -> str:
    """``KVM (kvm_pvm)`` or ``emulator (Unicorn)`` for ``result``, from where it ran: for a column heading."""
    return resolve(result).short
