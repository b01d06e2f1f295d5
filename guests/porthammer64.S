# porthammer64: a faulty guest that hammers I/O ports nothing claims, forever.
# Ring 0 sweeps the ports 0x100-0x1ff (no labkit device lives there: the UART is at 0x3f8,
# the PIC at 0x20/0xa0, the PIT at 0x40, labkit's own ports at 0xf0-0xf6): a 4-byte write,
# then a 4-byte read, each a port exit that labkit counts as unclaimed and answers with all
# ones.  It never halts: the run ends by its timeout.  Every read must be all ones; a read
# that is not makes it exit with code 1.

        .equ FIRST, 0x100
        .equ LAST, 0x1FF
        .equ DEBUG_EXIT, 0xF4

sweep:
        mov edx, FIRST
1:      mov eax, edx
        out dx, eax
        in eax, dx
        cmp eax, 0xFFFFFFFF
        jne wrong
        inc edx
        cmp edx, LAST
        jbe 1b
        jmp sweep
wrong:
        mov al, 1
        out DEBUG_EXIT, al
        hlt
