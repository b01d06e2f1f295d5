# scan64: VM B of the memory-isolation experiment scans every guest-physical address it can reach.
# Ring 3 looks for one qword (secret64's "TOPSECRT"; it keeps only the pattern's complement in
# memory and inverts it in a register, so the pattern itself is never stored in this VM) in
#   1. every aligned qword of its RAM, [0, RAM size);
#   2. above RAM, where nothing is stored and every read is an MMIO exit to labkit (answered
#      with all ones), one qword every STRIDE bytes up to LIMIT (labkit's page tables map
#      [0, 1 GiB) identity; reading every qword there would be 2^27 exits, so it samples);
# prints what it found through labkit's ring-0 services (int 4), then
#   3. reads 1 GiB, which the page tables do not map: a #PF (error code 0x4: user read, not
#      present; CR2 = 0x40000000) that labkit's default handler reports, ending the run.
# Parameter block, written by the host before the run (0: the default):
#   [0x80000] complement of the qword to look for (default ~"TOPSECRT")
#   [0x80008] RAM size in bytes (default 0x200000)
#   [0x80010] STRIDE above RAM (default 0x100000)
#   [0x80018] LIMIT (default and at most 0x40000000: labkit.x86.layout.MAPPED_LIMIT)
# Console: "scan: RAM [0x0, SIZE): Q qwords, M matches\n", "scan: above RAM [SIZE, LIMIT) every
# STRIDE: R reads (MMIO exits), A all ones, M matches\n", "scan: first match at ADDRESS\n" or
# "scan: no match\n", "scan: reading 0x40000000, which the page tables do not map\n" (counts decimal).

        .equ PARAMS, 0x80000
        .equ NOT_SECRET, 0xabadbcbaacafb0ab   # ~0x5452434553504f54 ("TOPSECRT")
        .equ SYS_WRITE, 1
        .equ UNMAPPED, 0x40000000       # labkit.x86.layout.MAPPED_LIMIT

        mov rbx, [PARAMS]               # rbx = the pattern (complement in memory)
        test rbx, rbx
        jnz 1f
        mov rbx, NOT_SECRET
1:      not rbx
        mov r12, [PARAMS + 8]           # r12 = RAM size
        test r12, r12
        jnz 1f
        mov r12d, 0x200000
1:      mov r13, [PARAMS + 16]          # r13 = stride
        test r13, r13
        jnz 1f
        mov r13d, 0x100000
1:      mov r14, [PARAMS + 24]          # r14 = limit
        mov eax, UNMAPPED
        test r14, r14
        cmovz r14, rax
        cmp r14, rax
        cmova r14, rax
        mov rbp, -1                     # rbp = first match

        xor r8d, r8d                    # r8 = matches in RAM
        xor esi, esi
ram:
        cmp [rsi], rbx
        jne 2f
        inc r8
        cmp rbp, -1
        jne 2f
        mov rbp, rsi
2:      add rsi, 8
        cmp rsi, r12
        jb ram

        xor r9d, r9d                    # r9 = reads above RAM
        xor r10d, r10d                  # r10 = all-ones answers
        xor r11d, r11d                  # r11 = matches above RAM
        mov rsi, r12
mmio:
        cmp rsi, r14
        jae scanned
        mov rax, [rsi]                  # an MMIO exit
        inc r9
        cmp rax, -1
        jne 3f
        inc r10
3:      cmp rax, rbx
        jne 4f
        inc r11
        cmp rbp, -1
        jne 4f
        mov rbp, rsi
4:      add rsi, r13
        jmp mmio
scanned:
        xor ebx, ebx                    # forget the pattern before anything is stored
        xor eax, eax

        lea rdi, [out]
        lea rsi, [s_ram]
        call put_str
        mov rax, r12
        call put_hex
        lea rsi, [s_ram2]
        call put_str
        mov rax, r12
        shr rax, 3
        call put_dec
        lea rsi, [s_qwords]
        call put_str
        mov rax, r8
        call put_dec
        lea rsi, [s_matches]
        call put_str

        lea rsi, [s_above]
        call put_str
        mov rax, r12
        call put_hex
        lea rsi, [s_comma]
        call put_str
        mov rax, r14
        call put_hex
        lea rsi, [s_every]
        call put_str
        mov rax, r13
        call put_hex
        lea rsi, [s_colon]
        call put_str
        mov rax, r9
        call put_dec
        lea rsi, [s_reads]
        call put_str
        mov rax, r10
        call put_dec
        lea rsi, [s_ones]
        call put_str
        mov rax, r11
        call put_dec
        lea rsi, [s_matches]
        call put_str

        cmp rbp, -1
        je 5f
        lea rsi, [s_first]
        call put_str
        mov rax, rbp
        call put_hex
        mov byte ptr [rdi], 10
        inc rdi
        jmp 6f
5:      lea rsi, [s_none]
        call put_str
6:      lea rsi, [s_reading]
        call put_str
        mov eax, UNMAPPED
        call put_hex
        lea rsi, [s_unmapped]
        call put_str

        mov rsi, rdi                    # write(out, rdi - out)
        lea rdi, [out]
        sub rsi, rdi
        mov eax, SYS_WRITE
        int 4
        mov eax, UNMAPPED
        mov rax, [rax]                  # #PF: not mapped
        hlt                             # not reached

put_str:                                # append the zero-terminated string at rsi to rdi
        mov al, [rsi]
        test al, al
        jz 1f
        mov [rdi], al
        inc rsi
        inc rdi
        jmp put_str
1:      ret

put_hex:                                # append "0x" and rax in hex without leading zeros
        mov word ptr [rdi], 0x7830
        add rdi, 2
        mov ecx, 60
        xor edx, edx                    # edx = 1 once a digit was written
1:      mov r15, rax
        shr r15, cl
        and r15d, 15
        test ecx, ecx
        jz 2f
        test edx, edx
        jnz 2f
        test r15d, r15d
        jz 3f
2:      mov r15b, [hexdigits + r15]
        mov [rdi], r15b
        inc rdi
        mov edx, 1
3:      sub ecx, 4
        jns 1b
        ret

put_dec:                                # append rax in decimal
        mov r15, rdi
        lea rdi, [decimal_end]
        mov ecx, 10
1:      xor edx, edx
        div rcx
        add dl, '0'
        dec rdi
        mov [rdi], dl
        test rax, rax
        jnz 1b
        mov rsi, rdi
        mov rdi, r15
        lea rcx, [decimal_end]
2:      mov al, [rsi]
        mov [rdi], al
        inc rsi
        inc rdi
        cmp rsi, rcx
        jb 2b
        ret

hexdigits:  .ascii "0123456789abcdef"
s_ram:      .asciz "scan: RAM [0x0, "
s_ram2:     .asciz "): "
s_qwords:   .asciz " qwords, "
s_matches:  .asciz " matches\n"
s_above:    .asciz "scan: above RAM ["
s_comma:    .asciz ", "
s_every:    .asciz ") every "
s_colon:    .asciz ": "
s_reads:    .asciz " reads (MMIO exits), "
s_ones:     .asciz " all ones, "
s_first:    .asciz "scan: first match at "
s_none:     .asciz "scan: no match\n"
s_reading:  .asciz "scan: reading "
s_unmapped: .asciz ", which the page tables do not map\n"
decimal:    .skip 24
decimal_end:
            .balign 8
out:        .skip 512
