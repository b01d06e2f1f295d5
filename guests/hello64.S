# hello64: 64-bit long mode, ring 0, paging on (identity map).
# Prints "Hello from 64-bit mode!" to the 16550A UART at COM1,
# waiting before each byte until the line status register says the transmitter
# holding register is empty (LSR = COM1 + 5, bit 5 THRE), then halts.
# Starts at 0x8000 in ring 0 (CS = KERNEL_CS64); under PVM every instruction here
# runs in KVM's instruction emulator (ring 0 is never run natively there).

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20

start:
        mov rsi, offset message
        mov dx, LSR
next:
        mov bl, [rsi]
        test bl, bl
        jz done
wait:
        in al, dx                       # poll the line status register
        test al, LSR_THRE
        jz wait
        mov al, bl
        mov dl, COM1 & 0xFF             # dx = COM1: the transmit holding register
        out dx, al
        mov dl, LSR & 0xFF
        inc rsi
        jmp next
done:
        hlt
        jmp done

message:
        .asciz "Hello from 64-bit mode!\n"
