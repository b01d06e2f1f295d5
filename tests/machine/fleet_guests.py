"""Guests for the fleet tests: a console flood and a few faulty ones, assembled with GNU as (labkit.Guest.from_asm)."""

from __future__ import annotations

import random

from labkit import Guest

FLOOD_CHUNK = 1 << 16  # labkit.vmm.devices.hypercall.MAX_WRITE


def console_flood(megabytes: int = 100) -> Guest:
    """Ring 0: fills 64 KiB with 'F' and passes it to the console ``megabytes`` MiB over, 64 KiB per ``WRITE``
    hypercall (two port exits each), then exits with code 7."""
    chunks = megabytes * (1 << 20) // FLOOD_CHUNK
    return Guest.from_asm(f"""
        mov edi, 0x10000
        mov ecx, {FLOOD_CHUNK}
        mov al, 'F'
        rep stosb
        mov r12d, {chunks}
    1:  mov eax, 1                  # HC_WRITE
        mov ebx, 0x10000
        mov ecx, {FLOOD_CHUNK}
        out 0xF0, eax               # layout.HYPERCALL_PORT
        in eax, 0xF0
        dec r12d
        jnz 1b
        mov al, 7
        out 0xF4, al                # layout.DEBUG_EXIT_PORT
        hlt
    """, name=f"flood{megabytes}m", description=f"floods the console with {megabytes} MiB")


def port_hammer() -> Guest:
    """Ring 0: writes and reads ports nobody claims, forever (ends by timeout)."""
    return Guest.from_asm("""
        xor edx, edx
    1:  out dx, al
        in al, dx
        add dx, 0x1234
        jmp 1b
    """, name="porthammer", description="hammers unclaimed ports")


def wild_writes() -> Guest:
    """Ring 0: stores across its whole guest-physical range and beyond RAM (MMIO exits), then halts."""
    return Guest.from_asm("""
        mov rdi, 0x100000           # above the code and the page tables
        mov rax, 0xDEADBEEFCAFEF00D
    1:  mov [rdi], rax
        add rdi, 0x10000
        cmp rdi, 0x3FF00000         # the identity map's end: 1 GiB
        jb 1b
        hlt
    """, name="wildwrites", description="writes everywhere it can reach")


def random_bytes(seed: int = 11) -> Guest:
    """Random machine code (what it does is whatever the bytes decode to)."""
    rng = random.Random(seed)
    return Guest.from_bytes(bytes(rng.randrange(256) for _ in range(4096)), name=f"random{seed}",
                            description="random bytes executed as code")
