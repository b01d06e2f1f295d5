# minikernel64: a tiny 64-bit kernel written for ring 0, run unmodified natively
# (ring 0) and deprivileged in ring 3 under trap-and-emulate or binary translation
# (labkit.monitor). It loads its own GDT and IDT (lgdt, lidt), reloads CR3, prints
# through the COM1 UART with port I/O, installs its own exception handlers, then
# runs the routines selected by the mask at offset 16 (bit i = ROUTINES[i] in
# labkit.monitor.trap_emulate) and halts. Each routine prints what the kernel
# observes, so the console shows where a monitor cannot hide that it is there:
#
#   cli_pushf          cli, then pushf: IF as the kernel sees it
#   popf               sti; pushf; cli; popf (restores IF = 1); then ud2: the #UD
#                      handler prints IF in the interrupted code's saved RFLAGS
#   sgdt / sidt        the GDT / IDT base and limit the CPU reports
#   smsw               sets CR0.TS with mov cr0, reads it back with smsw, clts
#   fault              ud2 with IF = 0: the kernel's own #UD handler skips it
#   page_fault         reads 0x80000000 (beyond labkit's 1 GiB identity map): its
#                      #PF handler prints CR2 and the error code and skips the read
#   control_registers  mov from CR0, CR3, CR4
#   int                int 0x30 to its own handler (PVM cannot run a ring-0 int n)
#   timer              arms a timer at port 0xf3 (only the trap-and-emulate
#                      monitor's virtual timer exists), enables interrupts with
#                      popf, then with sti, and counts the ticks it saw
#   student            the student's own code (labkit.monitor.trap_emulate.minikernel)
#
# Every register the routines print is printed in hex. Ring-0 code under PVM runs
# in KVM's instruction emulator (about 1 us per instruction): keep it short.

        .equ COM1, 0x3F8
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ TIMER_PORT, 0xF3              # layout.MONITOR_TIMER_PORT
        .equ KERNEL_CS, 0x08
        .equ IDT_VECTORS, 0x31
        .equ DEFAULT_ROUTINES, 0xFF       # cli_pushf .. control_registers
        .equ CR0_TS, 8

start:
        jmp boot
        .org 8
        .ascii "ROUTINES"                 # magic: the routine mask follows
routines:
        .quad DEFAULT_ROUTINES

boot:
        lgdt [rip + gdt_pointer]
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
        lea rdi, [rip + idt + 0x20 * 16]
        lea rax, [rip + timer_handler]
        call set_gate
        lea rdi, [rip + idt + 0x30 * 16]
        lea rax, [rip + int30_handler]
        call set_gate
        lidt [rip + idt_pointer]
        mov rax, cr3                      # reload CR3 (flushes the TLB)
        mov cr3, rax
        lea rsi, [rip + msg_boot]
        call puts

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
        cli
halt:
        hlt
        jmp halt

# -- routines ----------------------------------------------------------------------

do_cli_pushf:
        lea rsi, [rip + msg_cli_pushf]
        call puts
        cli
        pushfq
        pop rax
        jmp print_if_and_newline

do_popf:
        lea rsi, [rip + msg_popf]
        call puts
        sti
        pushfq                            # save flags (IF = 1)
        cli
        popfq                             # restore them: IF = 1 again, natively
        ud2                               # the #UD handler prints the IF it interrupted
        cli
        ret

do_sgdt:
        sgdt [rip + scratch]
        lea rsi, [rip + msg_sgdt]
        jmp print_table_register

do_sidt:
        sidt [rip + scratch]
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

do_smsw:
        mov rax, cr0
        or rax, CR0_TS
        mov cr0, rax
        smsw rax
        clts
        push rax
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

do_fault:
        lea rsi, [rip + msg_fault]
        call puts
        ud2
        ret

do_page_fault:
        lea rsi, [rip + msg_page_fault]
        call puts
        mov rbx, 0x80000000
        mov rax, [rbx]                    # 3 bytes: the #PF handler skips them
        ret

do_control_registers:
        lea rsi, [rip + msg_cr0]
        call puts
        mov rax, cr0
        call put_hex
        lea rsi, [rip + msg_cr3]
        call puts
        mov rax, cr3
        call put_hex
        lea rsi, [rip + msg_cr4]
        call puts
        mov rax, cr4
        call put_hex
        jmp newline

do_int:
        lea rsi, [rip + msg_int]
        call puts
        int 0x30
        ret

do_timer:
        lea rsi, [rip + msg_timer]
        call puts
        cli
        out TIMER_PORT, al                # arm the timer: one tick, as soon as IF = 1
        push 0x202
        popfq                             # IF = 1, the way a flags restore does it
        nop
        lea rsi, [rip + msg_after_popf]
        call puts
        mov rax, [rip + ticks]
        call put_hex
        call newline
        sti
        nop
        lea rsi, [rip + msg_after_sti]
        call puts
        mov rax, [rip + ticks]
        call put_hex
        cli
        jmp newline

do_student:
        lea rsi, [rip + msg_student]
        call puts
        xor eax, eax
        # student routine goes here
        mov r13, rax
        lea rsi, [rip + msg_rax]
        call puts
        mov rax, r13
        call put_hex
        jmp newline

# -- exception and interrupt handlers ----------------------------------------------

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
        call print_if_and_newline
        add qword ptr [rsp + 16], 2       # skip the ud2
        pop rsi
        pop rax
        iretq

pf_handler:                               # frame: error code, RIP, CS, RFLAGS, RSP, SS
        push rax
        push rsi
        lea rsi, [rip + msg_pf]
        call puts
        mov rax, cr2
        call put_hex
        lea rsi, [rip + msg_error_code]
        call puts
        mov rax, [rsp + 16]
        call put_hex
        call newline
        add qword ptr [rsp + 24], 3       # skip the 3-byte load
        pop rsi
        pop rax
        add rsp, 8                        # drop the error code
        iretq

timer_handler:
        inc qword ptr [rip + ticks]
        iretq

int30_handler:
        push rsi
        lea rsi, [rip + msg_int30]
        call puts
        pop rsi
        iretq

unexpected:
        lea rsi, [rip + msg_unexpected]
        call puts
        cli
        jmp halt

# -- helpers: set_gate, puts, put_hex, put_digit, newline ----------------------------

        .include "idt_gate.inc"            # set_gate: rdi = gate, rax = handler; clobbers rdx

print_if_and_newline:                     # rax = RFLAGS: prints its IF bit
        shr eax, 9
        and eax, 1
        call put_digit
newline:
        mov al, 10
        jmp putc

put_digit:                                # al = 0..9
        add al, '0'
        jmp putc

        .include "kernel_print.inc"        # puts, put_hex (on this kernel's putc)

putc:                                     # al = byte; waits for LSR.THRE; keeps every register but rax
        push rdx
        push rax
        mov dx, LSR
putc_wait:
        in al, dx
        test al, LSR_THRE
        jz putc_wait
        pop rax
        mov dx, COM1
        out dx, al
        pop rdx
        ret

# -- data ------------------------------------------------------------------------------

routine_table:
        .quad do_cli_pushf, do_popf, do_sgdt, do_sidt, do_smsw, do_fault, do_page_fault
        .quad do_control_registers, do_int, do_timer, do_student
routine_table_end:

msg_boot:        .asciz "minikernel: own GDT and IDT loaded, CR3 reloaded\n"
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
msg_int:         .asciz "int 0x30\n"
msg_int30:       .asciz "  int 0x30 handler: software interrupt taken\n"
msg_timer:       .asciz "timer armed with IF = 0; popf with IF = 1\n"
msg_after_popf:  .asciz "  ticks after popf: "
msg_after_sti:   .asciz "  ticks after sti: "
msg_student:     .asciz "student routine\n"
msg_rax:         .asciz "  rax = "
msg_ud:          .asciz "  #UD handler: rip "
msg_ud_if:       .asciz ", IF in the interrupted code = "
msg_pf:          .asciz "  #PF handler: cr2 "
msg_error_code:  .asciz ", error code "
msg_unexpected:  .asciz "minikernel: unexpected exception or interrupt, halting\n"

        .balign 8
ticks:   .quad 0
scratch: .quad 0, 0
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF          # 0x08: 64-bit code, DPL 0
        .quad 0x00CF93000000FFFF          # 0x10: data, DPL 0
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt
idt_pointer:
        .word IDT_VECTORS * 16 - 1
        .quad idt
        .balign 16
        .ifdef IDT_ON_ITS_OWN_PAGE        # a student routine may .set it: then the IDT the kernel fills
        .balign 4096                      # at boot does not share a page with its code (see
        .endif                            # labkit.monitor.robin_irvine: fewer stores into translated code)
idt:
        .fill IDT_VECTORS * 16, 1, 0
