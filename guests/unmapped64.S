# unmapped64: touching guest-physical memory with no RAM behind it. The page tables
# map 0x10000000 (256 MiB), but the guest has only a few MiB of RAM: the write and
# the read each leave the guest as an MMIO exit (KVM_EXIT_MMIO) for labkit to answer.
# An address with no device reads as all ones, like an open bus. Prints what it read,
# "read 0xffffffff from 0x10000000", then halts.

        .equ COM1, 0x3F8
        .equ LSR, COM1 + 5
        .equ HOLE, 0x10000000

        mov dword ptr [HOLE], 0x12345678        # MMIO write exit
        mov ebx, dword ptr [HOLE]               # MMIO read exit: ebx = what labkit answered

        mov rsi, offset prefix
        call puts
        mov ecx, 8                              # eight hex digits of ebx, high nibble first
digit:
        rol ebx, 4
        mov eax, ebx
        and eax, 0xF
        mov al, [hexdigits + rax]
        call putc
        dec ecx
        jnz digit
        mov rsi, offset suffix
        call puts
done:
        hlt
        jmp done

# putc: send al to COM1 once the transmitter is empty. Clobbers dx.
putc:
        push rax
        mov dx, LSR
wait:
        in al, dx
        test al, 0x20
        jz wait
        pop rax
        mov dx, COM1
        out dx, al
        ret

# puts: send the zero-terminated string at rsi. Clobbers rax, rdx, rsi.
puts:
        mov al, [rsi]
        test al, al
        jz 1f
        call putc
        inc rsi
        jmp puts
1:      ret

prefix:     .asciz "read 0x"
suffix:     .asciz " from 0x10000000\n"
hexdigits:  .ascii "0123456789abcdef"
