"""labkit: see how virtualization works by running tiny x86 guests under KVM or under emulation."""
