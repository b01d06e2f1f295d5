# compute64: heavy work in ring 3, a little kernel in ring 0. Sums the lengths of
# the Collatz sequences of 1..10000 (n -> n/2 or 3n+1 until 1): about 850,000 steps,
# all in ring 3 (user=True), where PVM runs the guest natively. Then it asks labkit's
# ring-0 kernel services (int 4, see labkit.x86.boot) to print the result and to
# exit with code 0: ring-3 port I/O would fault, so the kernel does the out.
# Prints "collatz steps 1..10000: 849666\n".

        .equ LIMIT, 10000
        .equ SYS_EXIT, 0
        .equ SYS_WRITE, 1

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
        cmp r9, LIMIT
        jbe outer

        # r8 in decimal, written backwards from the end of the buffer
        lea rdi, [digits_end]
        mov rax, r8
        mov ecx, 10
convert:
        xor edx, edx
        div rcx
        add dl, '0'
        dec rdi
        mov [rdi], dl
        test rax, rax
        jnz convert

        mov r10, rdi                    # r10 = first digit
        mov eax, SYS_WRITE              # write(prefix, its length)
        lea rdi, [prefix]
        mov esi, prefix_end - prefix
        int 4
        mov eax, SYS_WRITE              # write(digits and newline, their length)
        mov rdi, r10
        lea rsi, [digits_end + 1]
        sub rsi, rdi
        int 4
        mov eax, SYS_EXIT               # exit(0): the kernel writes 0 to the debug-exit port
        xor edi, edi
        int 4

prefix:     .ascii "collatz steps 1..10000: "
prefix_end:
digits:     .skip 20
digits_end: .byte 10                    # newline after the digits
