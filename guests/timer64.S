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
        .equ KERNEL_CS, 0x08
        .equ TIMER_VECTOR, 0x20         # ICW2: IR0 arrives as vector 0x20
        .equ RFLAGS_IF, 0x200

        .include "pic_pit.inc"             # pic_init, pit_start, timer_stop: the PIC and the PIT

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

        pic_init 0xFE                   # OCW1: only IR0 (the timer) unmasked

        pit_start [rip + pit_count]

wait_tick:                              # IF = 0 here
        mov eax, [rip + ticks]
        cmp eax, [rip + tick_target]
        jae done
        sti
        hlt                             # a tick wakes it; the handler returns after the hlt
        cli
        jmp wait_tick

done:
        timer_stop
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

        .include "idt_gate.inc"            # set_gate: rdi = gate, rax = handler; clobbers rdx

        .include "uart_print.inc"          # put_decimal, puts, putc (polling COM1)

msg_ticks:
        .asciz "ticks: "
        .balign 8
ticks:
        .long 0
idtr:
        .word 0
        .quad 0
