# compute64: heavy work in ring 3, a little kernel in ring 0. Sums the lengths of
# the Collatz sequences of 1..N (n -> n/2 or 3n+1 until 1), all in ring 3
# (user=True), where PVM runs the guest natively. Then it asks labkit's ring-0
# kernel services (int 4, see labkit.x86.boot) to print the result and to exit
# with code 0: ring-3 port I/O would fault, so the kernel does the out.
# How much it computes is set by a parameter block the host writes before the run
# (zeros: the default), so a benchmark can make it compute for as long as it needs:
#   [0x80000] limit   N, at most 2**32 - 1 (default 10000: about 850,000 steps)
# Every sequence starting below 2**32 stays below 2**63 (the largest, from
# 1,410,123,943, peaks at 7,125,885,122,794,452,160: Oliveira e Silva's path
# records), so 3n+1 never overflows; a larger limit prints an error and exits 1.
# Prints "collatz steps 1..N: <total>\n"; with the default,
# "collatz steps 1..10000: 849666\n".

        .equ PARAMS, 0x80000
        .equ DEFAULT_LIMIT, 10000
        .equ SYS_EXIT, 0
        .equ SYS_WRITE, 1

        mov r11, [PARAMS]               # r11 = N
        test r11, r11
        jnz 1f
        mov r11d, DEFAULT_LIMIT
1:      mov rax, r11
        shr rax, 32
        jnz too_large

        xor r8d, r8d                    # r8 = total steps
        mov r9d, 1                      # r9 = n
outer:
        mov rax, r9
count:
        cmp rax, 1
        je next_n
        inc r8
        test al, 1
        jnz odd
        shr rax, 1
        jmp count
odd:
        lea rax, [rax + rax * 2 + 1]
        jmp count
next_n:
        inc r9
        cmp r9, r11
        jbe outer

        mov eax, SYS_WRITE              # write("collatz steps 1..")
        lea rdi, [prefix]
        mov esi, prefix_end - prefix
        int 4
        mov rax, r11                    # write(N)
        call write_decimal
        mov eax, SYS_WRITE              # write(": ")
        lea rdi, [separator]
        mov esi, 2
        int 4
        mov rax, r8                     # write(total)
        call write_decimal
        mov eax, SYS_WRITE              # write("\n")
        lea rdi, [newline]
        mov esi, 1
        int 4
        mov eax, SYS_EXIT               # exit(0): the kernel writes 0 to the debug-exit port
        xor edi, edi
        int 4

too_large:
        mov eax, SYS_WRITE
        lea rdi, [refused]
        mov esi, refused_end - refused
        int 4
        mov eax, SYS_EXIT               # exit(1)
        mov edi, 1
        int 4

# write_decimal: print rax in decimal (digits written backwards from the end of
# the buffer). Clobbers rax, rcx, rdx, rsi, rdi.
write_decimal:
        lea rdi, [digits_end]
        mov ecx, 10
convert:
        xor edx, edx
        div rcx
        add dl, '0'
        dec rdi
        mov [rdi], dl
        test rax, rax
        jnz convert
        lea rsi, [digits_end]
        sub rsi, rdi                    # the number of digits
        mov eax, SYS_WRITE
        int 4
        ret

prefix:     .ascii "collatz steps 1.."
prefix_end:
separator:  .ascii ": "
newline:    .byte 10
refused:    .ascii "collatz: the limit at 0x80000 must be below 2**32\n"
refused_end:
digits:     .skip 20
digits_end:
