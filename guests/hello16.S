# hello16: real mode. Prints "Hello from 16-bit mode!" to the 16550A UART at COM1,
# waiting before each byte until the line status register says the transmitter
# holding register is empty (LSR = COM1 + 5, bit 5 THRE), then halts.
# Starts at 0000:8000 with DS = 0; every instruction here runs in KVM's emulator
# under PVM (real mode is never run natively there).

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20

start:
        mov si, offset message
        mov dx, LSR
next:
        mov bl, [si]
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
        inc si
        jmp next
done:
        hlt
        jmp done

message:
        .asciz "Hello from 16-bit mode!\n"
