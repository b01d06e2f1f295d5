"""Shared test set-up: which backends exist here.

KVM tests run whenever ``/dev/kvm`` exists and fail (never skip) if it is there
but broken; only a machine with no ``/dev/kvm`` at all skips them, with a reason.
"""

from __future__ import annotations

import pytest
from backends import HAS_KVM, NO_KVM_REASON

BACKENDS = [
    pytest.param("emu", marks=pytest.mark.emu),
    pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(not HAS_KVM, reason=NO_KVM_REASON)]),
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kvm" in item.keywords and not HAS_KVM:
            item.add_marker(pytest.mark.skip(reason=NO_KVM_REASON))


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    """Each available backend in turn: ``emu`` always, ``kvm`` where /dev/kvm exists."""
    return request.param
