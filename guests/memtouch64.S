# memtouch64: ring 3 rewrites a working set of pages, pass after pass, then prints a checksum.
# The guest for dirty pages, diff snapshots and live migration: how many pages it dirties and
# how fast is set by a parameter block the host writes before the run (zeros: the defaults).
#   [0x80000] pages   working-set pages from 1 MiB up (default 256: 1 MiB; at most RAM - 1 MiB)
#   [0x80008] passes  passes over the working set (default 64)
#   [0x80010] spin    idle loop iterations after each store (default 0: dirty as fast as it can)
# Pass p stores p * 0x9E3779B97F4A7C15 + i into qword (p mod 512) of page i, so every page
# changes every pass. Then it sums every qword of the working set and asks labkit's ring-0
# services (int 4) to print "memtouch: <checksum in hex>\n" and to exit with code 0.

        .equ PARAMS, 0x80000
        .equ BASE, 0x100000
        .equ SYS_EXIT, 0
        .equ SYS_WRITE, 1

        mov r12, [PARAMS]               # r12 = pages
        test r12, r12
        jnz 1f
        mov r12d, 256
1:      mov r13, [PARAMS + 8]           # r13 = passes
        test r13, r13
        jnz 2f
        mov r13d, 64
2:      mov r14, [PARAMS + 16]          # r14 = spin
        mov r15, 0x9E3779B97F4A7C15
        xor r9d, r9d                    # r9 = pass
pass:
        mov rax, r9
        and eax, 511
        lea rdi, [BASE + rax * 8]       # qword (pass mod 512) of the first page
        mov rdx, r9
        imul rdx, r15                   # value for page 0
        xor r10d, r10d                  # r10 = page
page:
        lea rax, [rdx + r10]
        mov [rdi], rax
        add rdi, 4096
        mov rcx, r14
spin:
        test rcx, rcx
        jz spun
        dec rcx
        jmp spin
spun:
        inc r10
        cmp r10, r12
        jb page
        inc r9
        cmp r9, r13
        jb pass

        xor r8d, r8d                    # r8 = sum of every qword of the working set
        mov rsi, BASE
        mov rcx, r12
        shl rcx, 9                      # qwords = pages * 512
sum:
        add r8, [rsi]
        add rsi, 8
        dec rcx
        jnz sum

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
        lea rdi, [prefix]
        lea rsi, [digits_end + 1]
        sub rsi, rdi
        int 4
        mov eax, SYS_EXIT
        xor edi, edi
        int 4

hexdigits:  .ascii "0123456789abcdef"
prefix:     .ascii "memtouch: "
digits:     .skip 16
digits_end: .byte 10
