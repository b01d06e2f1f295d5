# usertasks64: a ring-0 kernel runs ring-3 tasks that break the rules; it reports each fault and survives.
#
# The kernel (labkit's GDT, TSS and IDT; it finds the IDT with sidt) installs its own gates
# for #PF (14), for `int 4` (DPL 3: a task's "I am done") and for the timer (0x20, PIC
# master base 0x20), then edits labkit's identity page table for the first 2 MiB:
#   0x30000  U/S = 0   a kernel page: ring 3 may neither read nor write it
#   0x31000  R/W = 0   read-only (CR0.WP = 1, so not even ring 0 may write it)
#   0x32000  P = 0     not present
# and reloads CR3.  Then it enters eight tasks one after another in ring 3 (iretq; RFLAGS.IF
# = 1).  Each task is one access followed by `int 4`; a task that faults never gets there.
# The #PF handler prints the error code with its bits decoded (Intel SDM Vol. 3A, 4.7:
# bit 0 P = protection violation rather than a not-present page, bit 1 W/R = write, bit 2
# U/S = user-mode access), CR2 and the faulting RIP, kills the task (resets its stack) and
# starts the next one.  The last task loops (`jmp $`): the kernel programs the 8254 PIT
# (mode 2, count at offset 20, 1193: about 1 ms) and unmasks IR0 only for it; the timer
# handler counts the ticks that interrupted ring 3 and, after the number at offset 16 (5),
# kills the task.  Finally the kernel prints "kernel: 8 tasks run, 6 killed, still running"
# and exits with code 0 through the debug-exit port.  A #PF from ring 0 would be a kernel
# bug: the handler then prints "kernel: #PF in ring 0" and exits 1.
# "USERTASK" at offset 8 marks the patchable offsets 16 (.long ticks) and 20 (.word count).

        .equ COM1, 0x3F8                # labkit.x86.layout.COM1_PORT
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ DEBUG_EXIT, 0xF4
        .equ KERNEL_CS, 0x08            # labkit.x86.layout's selectors
        .equ USER_CS, 0x2B
        .equ USER_DS, 0x23
        .equ KERNEL_STACK, 0x70000      # labkit.x86.layout.KERNEL_STACK_TOP (the TSS's RSP0)
        .equ USER_STACK, 0x78000
        .equ PAGE_TABLE, 0x7000         # labkit's PT for the first 2 MiB (4 KiB pages)
        .equ KERNEL_PAGE, 0x30000
        .equ READ_ONLY, 0x31000
        .equ NOT_PRESENT, 0x32000
        .equ TIMER_VECTOR, 0x20
        .equ RFLAGS_IF, 0x200
        .equ TASKS, 8

        .include "pic_pit.inc"             # pic_init, pit_start, timer_stop: the PIC and the PIT

start:
        jmp boot
        .org 8
        .ascii "USERTASK"
tick_target:
        .long 5
pit_count:
        .word 1193

boot:
        mov rsp, KERNEL_STACK
        sidt [rip + idtr]
        mov rbx, [rip + idtr + 2]       # rbx = IDT base
        lea rdi, [rbx + 14 * 16]
        lea rax, [rip + pf_handler]
        mov edx, 0x8E00                 # present, DPL 0, interrupt gate
        call set_gate
        lea rdi, [rbx + 4 * 16]
        lea rax, [rip + done_handler]
        mov edx, 0xEE00                 # present, DPL 3: ring 3 may `int 4`
        call set_gate
        lea rdi, [rbx + TIMER_VECTOR * 16]
        lea rax, [rip + timer_handler]
        mov edx, 0x8E00
        call set_gate

        pic_init 0xFF                   # OCW1: every line masked until the looping task

        mov byte ptr [KERNEL_PAGE], 0x4B        # something to read, for a task that could
        and qword ptr [PAGE_TABLE + (KERNEL_PAGE >> 12) * 8], ~4      # U/S = 0
        and qword ptr [PAGE_TABLE + (READ_ONLY >> 12) * 8], ~2        # R/W = 0
        and qword ptr [PAGE_TABLE + (NOT_PRESENT >> 12) * 8], ~1      # P = 0
        mov rax, cr3                    # flush the TLB
        mov cr3, rax

next_task:                              # ring 0, IF = 0, any stack
        mov rsp, KERNEL_STACK
        mov ebx, [rip + task_index]
        cmp ebx, TASKS
        jae all_done
        lea rsi, [rip + s_task]
        call puts
        lea eax, [rbx + 1]
        call put_decimal
        lea rsi, [rip + s_colon]
        call puts
        lea rax, [rip + task_names]
        mov rsi, [rax + rbx * 8]
        call puts
        cmp ebx, TASKS - 1
        jne 1f
        pit_start [rip + pit_count]     # the looping task: start the timer
        mov al, 0xFE                    # OCW1: only IR0 unmasked
        out PIC_DATA, al
1:      push USER_DS                    # SS
        push USER_STACK                 # RSP
        push RFLAGS_IF | 2              # RFLAGS
        push USER_CS                    # CS
        lea rax, [rip + task_entries]
        push qword ptr [rax + rbx * 8]  # RIP
        iretq

kill_task:                              # the current task is dead: count it, start the next
        inc dword ptr [rip + killed]
finish_task:
        inc dword ptr [rip + task_index]
        jmp next_task

pf_handler:                             # [rsp] error code, then RIP, CS, RFLAGS, RSP, SS
        test byte ptr [rsp + 16], 3
        jz kernel_fault
        lea rsi, [rip + s_pf]
        call puts
        mov rax, [rsp]
        call put_hex
        lea rsi, [rip + s_p]
        call puts
        mov eax, [rsp]
        and eax, 1
        call put_decimal
        lea rsi, [rip + s_wr]
        call puts
        mov eax, [rsp]
        shr eax, 1
        and eax, 1
        call put_decimal
        lea rsi, [rip + s_us]
        call puts
        mov eax, [rsp]
        shr eax, 2
        and eax, 1
        call put_decimal
        lea rsi, [rip + s_cr2]
        call puts
        mov rax, cr2
        call put_hex
        lea rsi, [rip + s_rip]
        call puts
        mov rax, [rsp + 8]
        call put_hex
        lea rsi, [rip + s_killed]
        call puts
        jmp kill_task

kernel_fault:
        lea rsi, [rip + s_kernel_fault]
        call puts
        mov al, 1
        out DEBUG_EXIT, al
        hlt

done_handler:                           # int 4 from the task: it finished
        lea rsi, [rip + s_finished]
        call puts
        jmp finish_task

timer_handler:                          # on RSP0: RIP, CS, RFLAGS, RSP, SS of the task
        push rax
        test byte ptr [rsp + 16], 3     # CS.RPL of the interrupted code
        jz 1f
        inc dword ptr [rip + user_ticks]
1:      mov al, OCW2_EOI
        out PIC_COMMAND, al
        mov eax, [rip + user_ticks]
        cmp eax, [rip + tick_target]
        jae 2f
        pop rax
        iretq
2:      timer_stop
        lea rsi, [rip + s_preempted]
        call puts
        mov eax, [rip + user_ticks]
        call put_decimal
        lea rsi, [rip + s_times]
        call puts
        jmp kill_task

all_done:
        lea rsi, [rip + s_done]
        call puts
        mov eax, [rip + task_index]
        call put_decimal
        lea rsi, [rip + s_run]
        call puts
        mov eax, [rip + killed]
        call put_decimal
        lea rsi, [rip + s_alive]
        call puts
        xor eax, eax
        out DEBUG_EXIT, al
        hlt                             # not reached: the write ends the run

set_gate:                               # rdi = gate, rax = handler, dx = type word; clobbers rax
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], KERNEL_CS
        mov word ptr [rdi + 4], dx
        shr rax, 16
        mov word ptr [rdi + 6], ax
        shr rax, 16
        mov dword ptr [rdi + 8], eax
        mov dword ptr [rdi + 12], 0
        ret

put_hex:                                # "0x" and rax in hex without leading zeros; clobbers rax, rcx, rdx
        push rbx
        mov rbx, rax
        mov al, '0'
        call putc
        mov al, 'x'
        call putc
        mov ecx, 60
        xor edx, edx                    # edx = 1 once a digit was written
1:      mov rax, rbx
        shr rax, cl
        and eax, 15
        test ecx, ecx
        jz 2f
        test edx, edx
        jnz 2f
        test eax, eax
        jz 3f
2:      lea rdx, [rip + hexdigits]
        mov al, [rdx + rax]
        call putc
        mov edx, 1
3:      sub ecx, 4
        jns 1b
        pop rbx
        ret

        .include "uart_print.inc"          # put_decimal, puts, putc (polling COM1)

# ---- the ring-3 tasks: one access each, then `int 4` ("done") --------------------------
t_read_kernel:
        mov al, [KERNEL_PAGE]
        int 4
t_write_kernel:
        mov byte ptr [KERNEL_PAGE], 1
        int 4
t_read_only_read:
        mov al, [READ_ONLY]
        int 4
t_read_only_write:
        mov byte ptr [READ_ONLY], 1
        int 4
t_absent_read:
        mov al, [NOT_PRESENT]
        int 4
t_absent_write:
        mov byte ptr [NOT_PRESENT], 1
        int 4
t_own_page:
        mov byte ptr [USER_STACK - 8], 1
        mov al, [USER_STACK - 8]
        int 4
t_loop:
        jmp t_loop                      # jmp $: only the timer takes the CPU away

        .balign 8
task_entries:
        .quad t_read_kernel, t_write_kernel, t_read_only_read, t_read_only_write
        .quad t_absent_read, t_absent_write, t_own_page, t_loop
task_names:
        .quad n_read_kernel, n_write_kernel, n_read_only_read, n_read_only_write
        .quad n_absent_read, n_absent_write, n_own_page, n_loop
n_read_kernel:      .asciz "reads kernel page 0x30000: "
n_write_kernel:     .asciz "writes kernel page 0x30000: "
n_read_only_read:   .asciz "reads read-only page 0x31000: "
n_read_only_write:  .asciz "writes read-only page 0x31000: "
n_absent_read:      .asciz "reads not-present page 0x32000: "
n_absent_write:     .asciz "writes not-present page 0x32000: "
n_own_page:         .asciz "writes and reads its own stack page: "
n_loop:             .asciz "loops forever (jmp $): "
s_task:             .asciz "task "
s_colon:            .asciz " "
s_pf:               .asciz "#PF, error code "
s_p:                .asciz " (P="
s_wr:               .asciz " W/R="
s_us:               .asciz " U/S="
s_cr2:              .asciz "), cr2 "
s_rip:              .asciz ", rip "
s_killed:           .asciz ": killed\n"
s_finished:         .asciz "finished without a fault\n"
s_preempted:        .asciz "preempted by the timer "
s_times:            .asciz " times: killed\n"
s_kernel_fault:     .asciz "kernel: #PF in ring 0\n"
s_done:             .asciz "kernel: "
s_run:              .asciz " tasks run, "
s_alive:            .asciz " killed, still running\n"
hexdigits:          .ascii "0123456789abcdef"
        .balign 8
task_index:         .long 0
killed:             .long 0
user_ticks:         .long 0
idtr:
        .word 0
        .quad 0
