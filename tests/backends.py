"""Which backends this machine has, for test modules and conftest alike.

A module of its own (not ``conftest``) so that test modules can import it
whatever other ``conftest.py`` files exist below ``tests/``.
"""

from __future__ import annotations

import os

KVM_DEVICE = "/dev/kvm"
HAS_KVM = os.path.exists(KVM_DEVICE) and os.environ.get("LABKIT_TEST_NO_KVM") != "1"
NO_KVM_REASON = f"{KVM_DEVICE} does not exist on this machine (the emulation path is tested instead)"
