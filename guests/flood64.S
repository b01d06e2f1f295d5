# flood64: a faulty guest that floods its console: numbered 64-byte lines to the UART, forever.
# Ring 0 writes each byte straight to COM1's transmit register without waiting for LSR.THRE
# (labkit's UART never backs up), so every byte is one port exit and the console grows as
# fast as the exits go.  It never halts: the run ends by its timeout, and the machine's
# console keeps a bounded tail (RunResult.console_dropped counts what was dropped).

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT

        mov dx, COM1
        xor ebx, ebx                    # ebx = line number
line:
        lea rsi, [line_text]
        mov eax, ebx                    # the line number's low 16 bits as 4 hex digits at 6..9
        mov ecx, 4
        lea rdi, [line_text + 9]
1:      mov r8d, eax
        and r8d, 15
        mov r8b, [hexdigits + r8]
        mov [rdi], r8b
        dec rdi
        shr eax, 4
        dec ecx
        jnz 1b
        mov ecx, 64
2:      mov al, [rsi]
        out dx, al
        inc rsi
        dec ecx
        jnz 2b
        inc ebx
        jmp line

hexdigits:  .ascii "0123456789abcdef"
line_text:  .ascii "flood 0000 the console of this guest fills and fills and fills.\n"
