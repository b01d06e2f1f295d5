# uart_console64: writes N bytes of a numbered test text to the 16550A UART, one port write per byte.
# The byte-wise half of labkit.virtio.measure_console (ring_console64 is the other half; both
# print exactly the same text). Like a real 16550 console driver (and hello64) it polls the line
# status register until THRE says the transmitter is free before every byte, so each byte costs
# two port-I/O exits: `in` of LSR and `out` to THR.
# Parameters (written by the host into guest RAM before the run; labkit.virtio.measure):
#   0x80000  u32 magic "VQPB" (0x42505156)   0x80004  u32 total bytes N
# The text: 64-byte lines "line 00000 a..zA..Z\n", numbered from 0 (labkit.virtio.expected_console).
# Without a parameter block (magic missing) it writes 1 KiB. Ends with exit code 0 (debug-exit port).
# Ring 0, long mode; under PVM every instruction here runs in KVM's instruction emulator.

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ DEBUG_EXIT, 0xF4           # layout.DEBUG_EXIT_PORT
        .equ PARAMS, 0x80000            # labkit.virtio.measure.PARAMS_ADDRESS
        .equ MAGIC, 0x42505156
        .equ LINE, 64

start:
        mov r12d, 1024                  # no parameter block (magic missing): 1 KiB
        mov esi, PARAMS
        cmp dword ptr [rsi], MAGIC
        jne 1f
        mov r12d, [rsi + 4]             # bytes left to write
1:
        xor ebx, ebx                    # position in the current line
        mov dx, LSR
next_byte:
        test r12, r12
        jz finish
        cmp ebx, LINE
        jne 1f
        call next_line
1:
        mov cl, [rbx + line]
wait_thre:
        in al, dx                       # poll the line status register
        test al, LSR_THRE
        jz wait_thre
        mov dl, COM1 & 0xFF             # dx = COM1: the transmit holding register
        mov al, cl
        out dx, al
        mov dl, LSR & 0xFF
        inc ebx
        dec r12
        jmp next_byte

finish:
        xor eax, eax
        out DEBUG_EXIT, al
        hlt

# Count the line number (5 ASCII digits at line + 5) up by one; rbx = 0. Uses rax only.
next_line:
        lea rax, [line + 9]
2:
        inc byte ptr [rax]
        cmp byte ptr [rax], '9' + 1
        jne 3f
        mov byte ptr [rax], '0'
        dec rax
        cmp rax, offset line + 5
        jae 2b
3:
        xor ebx, ebx
        ret

line:
        .ascii "line 00000 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
