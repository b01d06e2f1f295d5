# secret64: VM A of the memory-isolation experiment fills its RAM with a secret pattern.
# Ring 3 stores the qword SECRET (the bytes "TOPSECRT") into every 8-byte slot from 1 MiB
# up to the end of its RAM, whose size the host writes to the parameter block before the
# run (0: the default 2 MiB).  Then it reads every slot back, counts those that hold the
# pattern, and asks labkit's ring-0 services (int 4) to print "secret: N qwords of TOPSECRT
# from 0x100000\n" (N in hex) and to exit with code 0.
#   [0x80000] RAM size in bytes (default 0x200000)
# A scanner in another VM (scan64) looks for the same qword and must never find it.

        .equ PARAMS, 0x80000
        .equ BASE, 0x100000
        .equ SECRET, 0x5452434553504f54       # "TOPSECRT", little endian
        .equ SYS_EXIT, 0
        .equ SYS_WRITE, 1

        mov r12, [PARAMS]               # r12 = end of RAM
        test r12, r12
        jnz 1f
        mov r12d, 0x200000
1:      mov rax, SECRET
        mov rdi, BASE
fill:
        mov [rdi], rax
        add rdi, 8
        cmp rdi, r12
        jb fill

        xor r8d, r8d                    # r8 = slots holding the pattern
        mov rsi, BASE
count:
        cmp [rsi], rax
        jne 2f
        inc r8
2:      add rsi, 8
        cmp rsi, r12
        jb count

        lea rdi, [digits_end]           # r8 in hex, written backwards
        mov ecx, 16
hex:
        mov eax, r8d
        and eax, 15
        mov al, [hexdigits + rax]
        dec rdi
        mov [rdi], al
        shr r8, 4
        dec ecx
        jnz hex

        mov eax, SYS_WRITE
        lea rdi, [message]
        lea rsi, [message_end]
        sub rsi, rdi
        int 4
        mov eax, SYS_EXIT
        xor edi, edi
        int 4

hexdigits:  .ascii "0123456789abcdef"
message:    .ascii "secret: 0x"
digits:     .skip 16
digits_end: .ascii " qwords of TOPSECRT from 0x100000\n"
message_end:
