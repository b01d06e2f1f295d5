# pvkernel64: minikernel64's routines rewritten the Xen way (paravirtualized). The
# kernel runs in ring 3 and knows it: it never executes a privileged or sensitive
# instruction. What minikernel64 does with cli, sti, pushf, popf, lgdt, lidt, sgdt,
# sidt, mov crN, smsw, clts, port I/O and hlt, this kernel asks the hypervisor for
# with a hypercall: `int 4` with the number in EAX and arguments in RDI, RSI, RDX,
# R10, R8 (Xen's x86-64 registers); the result comes back in RAX, negative errno
# values -4095..-1 are errors. The ABI (numbers after Xen's where Xen has the call)
# is documented in labkit/monitor/paravirt.py, which is the hypervisor:
#
#   0  set_trap_table(idt, limit)      lidt          17 version()            (probe)
#   2  set_gdt(gdt, limit)             lgdt          18 console_io(0, n, buf) UART output
#   5  fpu_taskswitch(set)             mov cr0 / clts 23 iret  [rsp] = RAX, then an iretq frame
#  13  multicall(entries, count)       a batch       26 mmuext_op(op, arg)    mov cr3
#  29  sched_op(cmd)                   hlt           48-53 irq_disable, irq_enable,
#                                                    irq_restore, irq_query (cli sti popf pushf),
#                                                    get_descriptor_table (sgdt sidt), read_cr
#
# Boot is one multicall (GDT, trap table, TLB flush, the boot line: one hypervisor
# entry); the console is line-buffered, one console_io per line instead of two
# port exits per byte; the exception handlers return with the iret hypercall.
#
# The routine mask at offset 16 has minikernel64's layout (bit i = ROUTINES[i] in
# labkit.monitor.trap_emulate); this kernel has the eight default routines. The
# quadword at 24 is the size of its code (everything before it is instructions). The two
# ud2 instructions, the GDT and the IDT sit at the addresses they have in
# minikernel64 (the .org lines below), so that both kernels print the same lines:
# tests/machine/test_paravirt.py compares the consoles of real runs.
#
# Run without labkit's paravirtual monitor, `int 4` reaches labkit's ring-0 kernel
# services instead (labkit.x86.boot), which answer the version probe with -1: the
# kernel then says so through those services and exits with code 1.

        .equ HC_SET_TRAP_TABLE, 0
        .equ HC_SET_GDT, 2
        .equ HC_FPU_TASKSWITCH, 5
        .equ HC_MULTICALL, 13
        .equ HC_VERSION, 17
        .equ HC_CONSOLE_IO, 18
        .equ HC_IRET, 23
        .equ HC_MMUEXT_OP, 26
        .equ HC_SCHED_OP, 29
        .equ HC_IRQ_DISABLE, 48
        .equ HC_IRQ_ENABLE, 49
        .equ HC_IRQ_RESTORE, 50
        .equ HC_IRQ_QUERY, 51
        .equ HC_GET_DESCRIPTOR_TABLE, 52
        .equ HC_READ_CR, 53
        .equ PV_ABI_VERSION, 0x10000       # 1.0, as (major << 16) | minor
        .equ CONSOLEIO_WRITE, 0
        .equ MMUEXT_TLB_FLUSH_LOCAL, 6
        .equ SCHEDOP_BLOCK, 1
        .equ SCHEDOP_SHUTDOWN, 2
        .equ SHUTDOWN_CRASH, 3
        .equ SERVICE_EXIT, 0               # labkit's ring-0 services, without the monitor
        .equ SERVICE_WRITE, 1
        .equ KERNEL_CS, 0x08
        .equ IDT_VECTORS, 0x31
        .equ DEFAULT_ROUTINES, 0xFF
        .equ LINE_SIZE, 128

        # where minikernel64 has them (offsets from its load address)
        .equ POPF_UD2, 0xFD
        .equ FAULT_UD2, 0x19C
        .equ GDT_OFFSET, 0x6A8
        .equ IDT_OFFSET, 0x6E0

.macro hypercall number
        mov eax, \number
        int 4
.endm

start:
        jmp boot
        .org 8
        .ascii "ROUTINES"                 # magic: the routine mask follows
routines:
        .quad DEFAULT_ROUTINES
code_size:
        .quad code_end - start            # where the instructions end (a test disassembles them all)

# -- routines (before the first fixed address) -------------------------------------

do_cli_pushf:
        lea rsi, [rip + msg_cli_pushf]
        call puts
        hypercall HC_IRQ_DISABLE          # cli
        hypercall HC_IRQ_QUERY            # pushf: the virtual IF, 0 or 1
        call put_digit
        jmp newline

do_popf:
        lea rsi, [rip + msg_popf]
        call puts
        hypercall HC_IRQ_ENABLE           # sti
        hypercall HC_IRQ_QUERY            # pushf (IF = 1)
        push rax
        hypercall HC_IRQ_DISABLE          # cli
        pop rdi
        hypercall HC_IRQ_RESTORE          # popf: IF = 1 again
        jmp popf_ud2

do_fault:
        lea rsi, [rip + msg_fault]
        call puts
        jmp fault_ud2

        .org POPF_UD2
popf_ud2:
        ud2                               # the #UD handler prints the IF it interrupted
        hypercall HC_IRQ_DISABLE
        ret

do_sgdt:
        xor edi, edi                      # 0: the GDT
        lea rsi, [rip + scratch]
        hypercall HC_GET_DESCRIPTOR_TABLE
        lea rsi, [rip + msg_sgdt]
        jmp print_table_register

do_sidt:
        mov edi, 1                        # 1: the IDT (trap table)
        lea rsi, [rip + scratch]
        hypercall HC_GET_DESCRIPTOR_TABLE
        lea rsi, [rip + msg_sidt]
print_table_register:
        call puts
        mov rax, [rip + scratch + 2]
        call put_hex
        lea rsi, [rip + msg_limit]
        call puts
        movzx eax, word ptr [rip + scratch]
        call put_hex
        jmp newline

        .org FAULT_UD2
fault_ud2:
        ud2                               # with IF = 0: the kernel's own #UD handler skips it
        ret

do_smsw:
        mov edi, 1
        hypercall HC_FPU_TASKSWITCH       # CR0.TS = 1
        xor edi, edi
        hypercall HC_READ_CR              # CR0
        push rax
        xor edi, edi
        hypercall HC_FPU_TASKSWITCH       # clts
        lea rsi, [rip + msg_smsw]
        call puts
        mov rax, [rsp]
        call put_hex
        lea rsi, [rip + msg_ts]
        call puts
        pop rax
        shr eax, 3
        and eax, 1
        call put_digit
        jmp newline

do_page_fault:
        lea rsi, [rip + msg_page_fault]
        call puts
        mov rbx, 0x80000000
        mov rax, [rbx]                    # 3 bytes: the #PF handler skips them
        ret

do_control_registers:                     # three reads, one hypervisor entry
        lea rdi, [rip + cr_batch]
        mov esi, (cr_batch_end - cr_batch) / 64
        hypercall HC_MULTICALL
        lea rsi, [rip + msg_cr0]
        call puts
        mov rax, [rip + cr_batch + 8]     # entry 0's result
        call put_hex
        lea rsi, [rip + msg_cr3]
        call puts
        mov rax, [rip + cr_batch + 64 + 8]
        call put_hex
        lea rsi, [rip + msg_cr4]
        call puts
        mov rax, [rip + cr_batch + 128 + 8]
        call put_hex
        jmp newline

# -- boot ----------------------------------------------------------------------------

boot:
        hypercall HC_VERSION              # is there a paravirtual hypervisor?
        cmp rax, PV_ABI_VERSION
        jne no_hypervisor
        lea rdi, [rip + idt]
        lea rax, [rip + unexpected]
        mov ecx, IDT_VECTORS
fill_idt:
        call set_gate
        add rdi, 16
        loop fill_idt
        lea rdi, [rip + idt + 6 * 16]
        lea rax, [rip + ud_handler]
        call set_gate
        lea rdi, [rip + idt + 14 * 16]
        lea rax, [rip + pf_handler]
        call set_gate
        lea rdi, [rip + boot_batch]       # GDT, trap table, TLB flush, boot line: one entry
        mov esi, (boot_batch_end - boot_batch) / 64
        hypercall HC_MULTICALL
        test rax, rax
        jnz boot_failed
        lea rsi, [rip + boot_batch + 8]
        mov ecx, (boot_batch_end - boot_batch) / 64
check_batch:
        cmp qword ptr [rsi], 0
        jl boot_failed                    # an entry's negative result: its error
        add rsi, 64
        loop check_batch

        mov r15, [rip + routines]
        xor r14d, r14d                    # r14 = routine number
next_routine:
        bt r15, r14
        jnc skip_routine
        lea rax, [rip + routine_table]
        call qword ptr [rax + r14 * 8]
skip_routine:
        inc r14
        cmp r14, (routine_table_end - routine_table) / 8
        jb next_routine

        lea rsi, [rip + msg_done]
        call puts
halt:
        hypercall HC_IRQ_DISABLE
        mov edi, SCHEDOP_BLOCK            # hlt: block until an event; with events masked, forever
        hypercall HC_SCHED_OP
        jmp halt

boot_failed:
        lea rsi, [rip + msg_boot_failed]
        call puts
        mov edi, SCHEDOP_SHUTDOWN
        mov esi, SHUTDOWN_CRASH
        hypercall HC_SCHED_OP
        jmp halt

no_hypervisor:                            # labkit's ring-0 services answered: say so, exit 1
        lea rdi, [rip + msg_no_hypervisor]
        mov esi, msg_no_hypervisor_end - msg_no_hypervisor
        mov eax, SERVICE_WRITE
        int 4
        mov edi, 1
        mov eax, SERVICE_EXIT
        int 4

# -- exception handlers: the hypervisor bounces the kernel's own exceptions here ----

ud_handler:                               # frame: RIP, CS, RFLAGS, RSP, SS
        push rax
        push rsi
        lea rsi, [rip + msg_ud]
        call puts
        mov rax, [rsp + 16]
        call put_hex
        lea rsi, [rip + msg_ud_if]
        call puts
        mov rax, [rsp + 32]
        shr eax, 9
        and eax, 1
        call put_digit
        call newline
        add qword ptr [rsp + 16], 2       # skip the ud2
        pop rsi
        hypercall HC_IRET                 # [rsp] = the saved RAX, then the frame
        jmp iret_failed

pf_handler:                               # frame: error code, RIP, CS, RFLAGS, RSP, SS
        push rax
        push rsi
        lea rsi, [rip + msg_pf]
        call puts
        mov edi, 2
        hypercall HC_READ_CR              # CR2: the kernel cannot mov from it
        call put_hex
        lea rsi, [rip + msg_error_code]
        call puts
        mov rax, [rsp + 16]
        call put_hex
        call newline
        add qword ptr [rsp + 24], 3       # skip the 3-byte load
        pop rsi
        pop rax
        mov [rsp], rax                    # RAX where the error code was: the iret frame
        hypercall HC_IRET
        jmp iret_failed

unexpected:
        lea rsi, [rip + msg_unexpected]
        call puts
        jmp halt

iret_failed:
        lea rsi, [rip + msg_iret_failed]
        call puts
        jmp halt

# -- helpers: set_gate, puts, put_hex, put_digit, newline, putc, flush ---------------

        .include "idt_gate.inc"            # set_gate: rdi = gate, rax = handler; clobbers rdx

newline:
        mov al, 10
        jmp putc

put_digit:                                # al = 0..9
        add al, '0'
        jmp putc

        .include "kernel_print.inc"        # puts, put_hex (on this kernel's putc)

putc:                                     # al = byte into the line buffer; a newline or a full
        push rcx                          # buffer sends it; keeps every register but rax
        push rdx
        lea rdx, [rip + line]
        mov rcx, [rip + line_length]
        mov [rdx + rcx], al
        inc rcx
        mov [rip + line_length], rcx
        cmp al, 10
        je putc_flush
        cmp rcx, LINE_SIZE
        jb putc_done
putc_flush:
        call flush
putc_done:
        pop rdx
        pop rcx
        ret

flush:                                    # console_io(write, length, line); keeps every register but rax
        push rdi
        push rsi
        push rdx
        mov edi, CONSOLEIO_WRITE
        mov rsi, [rip + line_length]
        lea rdx, [rip + line]
        hypercall HC_CONSOLE_IO
        mov qword ptr [rip + line_length], 0
        pop rdx
        pop rsi
        pop rdi
        ret
code_end:

# -- data ------------------------------------------------------------------------------

        .balign 8
routine_table:                            # minikernel64's order; int, timer, student: not here
        .quad do_cli_pushf, do_popf, do_sgdt, do_sidt, do_smsw, do_fault, do_page_fault
        .quad do_control_registers
routine_table_end:

        .org GDT_OFFSET
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF          # 0x08: 64-bit code, DPL 0 (the kernel's virtual ring 0)
        .quad 0x00CF93000000FFFF          # 0x10: data, DPL 0
gdt_end:

        .org IDT_OFFSET
idt:
        .fill IDT_VECTORS * 16, 1, 0
idt_end:

        .balign 64
boot_batch:                               # multicall entries: op, result, args[6] (Xen's layout)
        .quad HC_SET_GDT, 0, gdt, gdt_end - gdt - 1, 0, 0, 0, 0
        .quad HC_SET_TRAP_TABLE, 0, idt, idt_end - idt - 1, 0, 0, 0, 0
        .quad HC_MMUEXT_OP, 0, MMUEXT_TLB_FLUSH_LOCAL, 0, 0, 0, 0, 0
        .quad HC_CONSOLE_IO, 0, CONSOLEIO_WRITE, msg_boot_end - msg_boot, msg_boot, 0, 0, 0
boot_batch_end:
cr_batch:
        .quad HC_READ_CR, 0, 0, 0, 0, 0, 0, 0
        .quad HC_READ_CR, 0, 3, 0, 0, 0, 0, 0
        .quad HC_READ_CR, 0, 4, 0, 0, 0, 0, 0
cr_batch_end:

scratch:     .quad 0, 0
line_length: .quad 0
line:        .fill LINE_SIZE, 1, 0

msg_boot:        .ascii "minikernel: own GDT and IDT loaded, CR3 reloaded\n"
msg_boot_end:
msg_done:        .asciz "minikernel: done, halting\n"
msg_cli_pushf:   .asciz "cli, then pushf: IF = "
msg_popf:        .asciz "sti; pushf; cli; popf (restores IF = 1); ud2\n"
msg_sgdt:        .asciz "sgdt: GDT base "
msg_sidt:        .asciz "sidt: IDT base "
msg_limit:       .asciz ", limit "
msg_smsw:        .asciz "mov cr0 with TS set, then smsw: "
msg_ts:          .asciz ", TS = "
msg_fault:       .asciz "ud2 with IF = 0\n"
msg_page_fault:  .asciz "read from 0x80000000 (not mapped)\n"
msg_cr0:         .asciz "cr0 "
msg_cr3:         .asciz ", cr3 "
msg_cr4:         .asciz ", cr4 "
msg_ud:          .asciz "  #UD handler: rip "
msg_ud_if:       .asciz ", IF in the interrupted code = "
msg_pf:          .asciz "  #PF handler: cr2 "
msg_error_code:  .asciz ", error code "
msg_unexpected:  .asciz "pvkernel: unexpected exception, halting\n"
msg_boot_failed: .asciz "pvkernel: the hypervisor refused the boot batch, shutting down\n"
msg_iret_failed: .asciz "pvkernel: the iret hypercall failed, halting\n"
msg_no_hypervisor:
        .ascii "pvkernel: no paravirtual hypervisor (int 4 answered -1); "
        .ascii "run it with labkit.monitor.paravirt.run_paravirtual\n"
msg_no_hypervisor_end:
