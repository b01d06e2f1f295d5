# timer64: a 64-bit ring-0 guest that counts timer interrupts.
#
# It puts a gate for vector 0x20 into the IDT (labkit's, found with sidt),
# initialises the PC's master 8259A PIC (ICW1-ICW4, vector base 0x20, every line
# but IR0 masked) and programs the 8254 PIT's channel 0 as a rate generator
# (mode 2) with the count at offset 20 (1193: one tick per 0.99985 ms at the
# PC's 1.193182 MHz).  Then it waits with `sti; hlt` (the interrupt shadow of
# sti covers the hlt, so no tick slips in between) until its handler has
# counted the number of ticks at offset 16 (10), prints "ticks: N", stops the
# timer and exits with code 0 through the debug-exit port.
#
# The count is exact, whatever the host's timing: the main loop compares with
# IF = 0 and enables interrupts only below the target, and the handler that
# counts the last tick returns with IF = 0 (it clears IF in its frame), so no
# tick after the target is ever taken.  Each tick ends with a non-specific EOI.
#
# Offsets 16 (.long ticks wanted) and 20 (.word PIT count) may be patched by
# tests; "TIMER64" at offset 8 marks them.

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ DEBUG_EXIT, 0xF4
        .equ PIC_COMMAND, 0x20          # master 8259A: ICW1, OCW2, OCW3
        .equ PIC_DATA, 0x21             # ICW2-ICW4, OCW1 (IMR)
        .equ PIT_COUNTER0, 0x40         # 8254 channel 0
        .equ PIT_CONTROL, 0x43
        .equ KERNEL_CS, 0x08
        .equ TIMER_VECTOR, 0x20         # ICW2: IR0 arrives as vector 0x20
        .equ OCW2_EOI, 0x20             # non-specific end of interrupt
        .equ PIT_MODE2, 0x34            # channel 0, LSB then MSB, mode 2, binary
        .equ RFLAGS_IF, 0x200

start:
        jmp boot
        .org 8
        .ascii "TIMER64\0"
tick_target:
        .long 10
pit_count:
        .word 1193

boot:
        sidt [rip + idtr]
        mov rdi, [rip + idtr + 2]
        add rdi, TIMER_VECTOR * 16
        lea rax, [rip + timer_handler]
        call set_gate

        mov al, 0x11                    # ICW1: edge triggered, cascade mode, ICW4 follows
        out PIC_COMMAND, al
        mov al, TIMER_VECTOR            # ICW2: vector base
        out PIC_DATA, al
        mov al, 0x04                    # ICW3: a slave on IR2 (as on a PC)
        out PIC_DATA, al
        mov al, 0x01                    # ICW4: 8086 mode, normal EOI
        out PIC_DATA, al
        mov al, 0xFE                    # OCW1: only IR0 (the timer) unmasked
        out PIC_DATA, al

        mov al, PIT_MODE2
        out PIT_CONTROL, al
        mov ax, [rip + pit_count]
        out PIT_COUNTER0, al            # LSB
        mov al, ah
        out PIT_COUNTER0, al            # MSB: the counter starts

wait_tick:                              # IF = 0 here
        mov eax, [rip + ticks]
        cmp eax, [rip + tick_target]
        jae done
        sti
        hlt                             # a tick wakes it; the handler returns after the hlt
        cli
        jmp wait_tick

done:
        mov al, PIT_MODE2               # a control word stops the counter until a new count
        out PIT_CONTROL, al
        mov al, 0xFF                    # OCW1: mask every line
        out PIC_DATA, al
        lea rsi, [rip + msg_ticks]
        call puts
        mov eax, [rip + ticks]
        call put_decimal
        mov al, 10
        call putc
        xor eax, eax
        out DEBUG_EXIT, al
        hlt                             # not reached: the write ends the run

timer_handler:                          # frame: RIP, CS, RFLAGS, RSP, SS (IF = 0: interrupt gate)
        push rax
        inc dword ptr [rip + ticks]
        mov al, OCW2_EOI
        out PIC_COMMAND, al
        mov eax, [rip + ticks]
        cmp eax, [rip + tick_target]
        jb 1f
        and qword ptr [rsp + 24], ~RFLAGS_IF    # the last tick: return with interrupts off
1:      pop rax
        iretq

set_gate:                               # rdi = gate, rax = handler; clobbers rdx
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], KERNEL_CS
        mov word ptr [rdi + 4], 0x8E00  # present, DPL 0, 64-bit interrupt gate
        mov rdx, rax
        shr rdx, 16
        mov word ptr [rdi + 6], dx
        shr rdx, 16
        mov dword ptr [rdi + 8], edx
        mov dword ptr [rdi + 12], 0
        ret

        .include "uart_print.inc"          # put_decimal, puts, putc (polling COM1)

msg_ticks:
        .asciz "ticks: "
        .balign 8
ticks:
        .long 0
idtr:
        .word 0
        .quad 0
