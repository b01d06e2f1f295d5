# preempt64: a ring-0 kernel whose ring-3 task never gives the CPU back, preempted by the timer.
#
# The kernel puts a gate for vector 0x20 into the IDT (labkit's, found with
# sidt), initialises the PC's master 8259A PIC (vector base 0x20, only IR0
# unmasked), programs the 8254 PIT's channel 0 as a rate generator (mode 2)
# with the count at offset 20 (1193: about 1 ms), and enters its task in ring 3
# with iretq (labkit's GDT: USER_CS64 0x2b, USER_DS 0x23; RFLAGS.IF = 1).  The
# task is `jmp $`: it never makes a system call, never faults, never halts.
#
# Only the timer gets the kernel back: each tick enters the handler in ring 0
# on the TSS's RSP0 stack (labkit's KERNEL_STACK_TOP); the handler counts the
# tick, and counts it as taken from ring 3 when the interrupted CS has RPL 3,
# sends a non-specific EOI and returns to the task.  After the number of ticks
# at offset 16 (10) it does not return: it stops the timer, masks the PIC,
# prints "ticks: N, from ring 3: M" and exits with code 0 through the
# debug-exit port.  Interrupts are enabled only in ring 3, so every tick
# interrupts the task: M = N.
#
# Under PVM the task runs natively in hardware ring 3 and the kernel in KVM's
# instruction emulator; only the timer's interrupt makes KVM leave the task.
# Offsets 16 (.long ticks wanted) and 20 (.word PIT count) may be patched by
# tests; "PREEMPT" at offset 8 marks them.

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ DEBUG_EXIT, 0xF4
        .equ KERNEL_CS, 0x08            # labkit.x86.layout's selectors
        .equ USER_CS, 0x2B
        .equ USER_DS, 0x23
        .equ KERNEL_STACK, 0x70000      # labkit.x86.layout.KERNEL_STACK_TOP (the TSS's RSP0)
        .equ USER_STACK, 0x78000
        .equ TIMER_VECTOR, 0x20
        .equ RFLAGS_IF, 0x200

        .include "pic_pit.inc"             # pic_init, pit_start, timer_stop: the PIC and the PIT

start:
        jmp boot
        .org 8
        .ascii "PREEMPT\0"
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

        push USER_DS                    # SS
        push USER_STACK                 # RSP
        push RFLAGS_IF | 2              # RFLAGS: interrupts on in the task
        push USER_CS                    # CS
        lea rax, [rip + task]
        push rax                        # RIP
        iretq

timer_handler:                          # on RSP0: RIP, CS, RFLAGS, RSP, SS of the task
        push rax
        inc dword ptr [rip + ticks]
        test byte ptr [rsp + 16], 3     # CS.RPL of the interrupted code
        jz 1f
        inc dword ptr [rip + user_ticks]
1:      mov al, OCW2_EOI
        out PIC_COMMAND, al
        mov eax, [rip + ticks]
        cmp eax, [rip + tick_target]
        jae stop_task
        pop rax
        iretq

stop_task:                              # IF = 0, ring 0: the task is never resumed
        timer_stop
        mov rsp, KERNEL_STACK
        lea rsi, [rip + msg_ticks]
        call puts
        mov eax, [rip + ticks]
        call put_decimal
        lea rsi, [rip + msg_user]
        call puts
        mov eax, [rip + user_ticks]
        call put_decimal
        mov al, 10
        call putc
        xor eax, eax
        out DEBUG_EXIT, al
        hlt                             # not reached: the write ends the run

        .include "idt_gate.inc"            # set_gate: rdi = gate, rax = handler; clobbers rdx

        .include "uart_print.inc"          # put_decimal, puts, putc (polling COM1)

# ---- the ring-3 task ---------------------------------------------------------------
task:
        jmp task                        # jmp $: only an interrupt takes the CPU away

msg_ticks:
        .asciz "ticks: "
msg_user:
        .asciz ", from ring 3: "
        .balign 8
ticks:
        .long 0
user_ticks:
        .long 0
idtr:
        .word 0
        .quad 0
