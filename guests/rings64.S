# rings64: a tiny kernel in ring 0 with its own GDT, TSS and IDT runs a task in ring 3.
#
# The kernel loads its own GDT (selectors as labkit's, so STAR works), a TSS
# whose RSP0 is the kernel stack, and an IDT with handlers for #UD, #GP, #PF,
# `int 0x80` (a DPL-3 gate) and every other vector; it points LSTAR at its
# `syscall` entry, takes away the user bit of one page (SECRET) and the write
# bit of another (READ_ONLY) in labkit's identity page tables, and enters the
# task with iretq.  The task makes system calls (int 0x80, syscall), runs
# privileged instructions (each raises #GP) and touches the two pages (each
# raises #PF with an error code and CR2).  Before each instruction that should
# fault, the task puts the address to resume at in r15; the fault handlers
# resume there.
#
# Ring transitions cause no VM exit by themselves, so the kernel reports each
# one with four 4-byte writes to EVENTS (MMIO, above RAM): RIP, error code,
# CR2, then the event word  kind << 16 | from_cpl << 8 | vector  (kinds: 1
# entry through the IDT, 2 syscall entry, 3 return to ring 3, 4 kernel start,
# 5 task exit).  The RIP is the one the CPU saved: for a fault (#GP, #PF, #UD)
# the faulting instruction, for a trap (`int 0x80` through its gate, `syscall`,
# and so the exit) the instruction after it (SDM vol. 3, 6.5), for a return
# where the task resumes.  labkit.rings decodes the events from the exit
# trace.  MMIO rather than a port: under PVM the syscall entry runs where
# port I/O raises #GP.
#
# Under PVM (kvm_pvm) ring-3 `int 0x80` raises #UD; the #UD handler sees the
# bytes CD 80 at the faulting RIP, reports the #UD, and does the system call
# itself (trap-and-emulate in miniature).  System calls: eax = 0 exit(edi),
# 1 write(rdi, rsi) to COM1 (int 0x80 only: PVM's syscall path cannot do port
# I/O), 2 count of events reported so far.

.set KERNEL_CS, 0x08
.set KERNEL_DS, 0x10
.set USER_DS, 0x23
.set USER_CS, 0x2b
.set TSS_SEL, 0x30
.set TSS, 0x10000                 # 104-byte TSS, filled in at start-up
.set IDT, 0x11000                 # 256 gates of 16 bytes, built at start-up
.set KERNEL_STACK, 0x70000
.set USER_STACK, 0x7f000
.set SECRET, 0x30000              # user bit cleared: ring 3 may not touch it
.set READ_ONLY, 0x31000           # write bit cleared (CR0.WP = 1: not even ring 0 may write)
.set PAGE_TABLE, 0x7000           # labkit's PT for the first 2 MiB (4 KiB pages)
.set EVENTS, 0x10000000
.set COM1, 0x3f8
.set DEBUG_EXIT, 0xf4

kernel_start:
        lgdt [rip + gdtr]
        push KERNEL_CS                  # reload CS from the new GDT
        lea rax, [rip + 1f]
        push rax
        retfq
1:      mov eax, KERNEL_DS
        mov ds, eax
        mov es, eax
        mov ss, eax
        mov qword ptr [TSS + 4], KERNEL_STACK   # RSP0
        mov word ptr [TSS + 102], 104           # I/O map base: none
        mov ax, TSS_SEL
        ltr ax
        mov rsp, KERNEL_STACK

        lea rsi, [rip + unexpected]     # every gate first to `unexpected`
        xor ecx, ecx
2:      mov edx, ecx
        call set_gate
        inc ecx
        cmp ecx, 256
        jb 2b
        mov ecx, 6
        lea rsi, [rip + ud_handler]
        call set_gate
        mov ecx, 13
        lea rsi, [rip + gp_handler]
        call set_gate
        mov ecx, 14
        lea rsi, [rip + pf_handler]
        call set_gate
        mov ecx, 0x80
        lea rsi, [rip + int80_handler]
        call set_gate
        or byte ptr [IDT + 0x80 * 16 + 5], 0x60   # DPL 3: ring 3 may `int 0x80`
        lidt [rip + idtr]

        mov ecx, 0xc0000081             # STAR: sysret to 0x18+16 | 3, syscall to 0x08
        xor eax, eax
        mov edx, 0x00180008
        wrmsr
        mov ecx, 0xc0000082             # LSTAR
        lea rax, [rip + syscall_entry]
        mov rdx, rax
        shr rdx, 32
        wrmsr
        mov ecx, 0xc0000084             # SFMASK: clear IF, TF, DF
        mov eax, 0x700
        xor edx, edx
        wrmsr

        and qword ptr [PAGE_TABLE + (SECRET >> 12) * 8], ~4      # U/S = 0
        and qword ptr [PAGE_TABLE + (READ_ONLY >> 12) * 8], ~2   # R/W = 0
        mov rax, cr3                    # flush the TLB
        mov cr3, rax

        mov edi, 4 << 16                # event: kernel start (from ring 0)
        lea rsi, [rip + kernel_start]
        xor edx, edx
        xor r8d, r8d
        call report

        push USER_DS                    # enter the task in ring 3
        push USER_STACK
        push 0x202
        push USER_CS
        lea rax, [rip + task]
        push rax
        mov edi, 3 << 16                # event: return to ring 3
        mov rsi, rax
        xor edx, edx
        call report
        iretq

# set_gate: IDT gate ecx -> handler rsi (64-bit interrupt gate, DPL 0). Clobbers rax, rdi.
set_gate:
        mov edi, ecx
        shl edi, 4
        add edi, IDT
        mov rax, rsi
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], KERNEL_CS
        mov word ptr [rdi + 4], 0x8e00
        shr rax, 16
        mov word ptr [rdi + 6], ax
        shr rax, 16
        mov dword ptr [rdi + 8], eax
        mov dword ptr [rdi + 12], 0
        ret

# report: one event to EVENTS: rsi = RIP, edx = error code, r8d = CR2, edi = event word.
report:
        mov dword ptr [EVENTS], esi
        mov dword ptr [EVENTS + 4], edx
        mov dword ptr [EVENTS + 8], r8d
        mov dword ptr [EVENTS + 12], edi
        inc dword ptr [rip + event_count]
        ret

# Entry with an error code: [rsp] = error code, then RIP, CS, RFLAGS, RSP, SS.
gp_handler:
        push rdi
        push rsi
        push rdx
        push r8
        mov edi, 13
        xor r8d, r8d
        lea rsi, [rip + sysret_insn]
        cmp [rsp + 40], rsi
        je sysret_fault
        jmp fault_common
pf_handler:
        push rdi
        push rsi
        push rdx
        push r8
        mov edi, 14
        mov r8, cr2
fault_common:                           # report, then resume the task at its r15
        mov rsi, [rsp + 40]             # RIP
        mov rdx, [rsp + 48]             # CS
        and edx, 3
        shl edx, 8
        or edi, edx
        or edi, 1 << 16
        mov rdx, [rsp + 32]             # error code
        call report
        test byte ptr [rsp + 48], 3
        jz kernel_fault                 # a fault in the kernel itself: stop
        mov [rsp + 40], r15             # resume where the task asked
        mov rsi, r15
        mov edi, 3 << 16
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
        add rsp, 8                      # drop the error code
        iretq

# Under PVM the syscall entry runs in PVM's own supervisor mode, where sysretq
# raises #GP (as does port I/O).  Finish the return here: iretq to RCX/R11.
# The frame PVM pushes for that #GP holds the sysretq's RIP but the user CS
# (0x2b), so its RPL would blame ring 3; the instruction is the kernel's own,
# run in ring 0, and the event says so (from ring 0).  The "return to ring 3"
# reported just before the sysretq did not happen: labkit.rings sees an entry
# from ring 0 follow it.
sysret_fault:
        or edi, 1 << 16                 # entry, from ring 0, vector 13
        mov rdx, [rsp + 32]
        call report
        mov [rsp + 40], rcx             # RIP    = where syscall came from
        mov qword ptr [rsp + 48], USER_CS
        mov [rsp + 56], r11             # RFLAGS = as syscall saved them
        mov qword ptr [rsp + 72], USER_DS   # RSP stays: the task's stack
        mov rsi, rcx
        mov edi, 3 << 16
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
        add rsp, 8
        iretq

# #UD: PVM's answer to a ring-3 `int 0x80`; anything else is unexpected.
ud_handler:
        push rdi
        push rsi
        push rdx
        push r8
        mov rsi, [rsp + 32]             # RIP
        mov edi, (1 << 16) | 6
        test byte ptr [rsp + 40], 3
        jz 1f
        or edi, 3 << 8
1:      xor edx, edx
        xor r8d, r8d
        call report
        test byte ptr [rsp + 40], 3
        jz kernel_fault
        mov rsi, [rsp + 32]
        cmp word ptr [rsi], 0x80cd      # the bytes of `int 0x80`?
        jne kernel_fault
        add qword ptr [rsp + 32], 2     # emulate it: step over, then do the call
        pop r8
        pop rdx
        pop rsi
        pop rdi
        jmp int80_body

int80_handler:
        push rdi
        push rsi
        push rdx
        push r8
        mov rsi, [rsp + 32]             # RIP after the int
        mov edi, (1 << 16) | (3 << 8) | 0x80
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
int80_body:
        call service_io
        push rdi
        push rsi
        push rdx
        push r8
        mov rsi, [rsp + 32]
        mov edi, 3 << 16
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
        iretq

# syscall: RCX = return RIP, R11 = RFLAGS; still on the task's stack (a real
# kernel would switch stacks here).
syscall_entry:
        push rdi
        push rsi
        push rdx
        push r8
        mov rsi, rcx
        mov edi, (2 << 16) | (3 << 8)
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
        call service
        push rdi
        push rsi
        push rdx
        push r8
        mov rsi, rcx
        mov edi, 3 << 16
        xor edx, edx
        xor r8d, r8d
        call report
        pop r8
        pop rdx
        pop rsi
        pop rdi
sysret_insn:
        sysretq

# service_io: the system calls that may do port I/O (eax 0 exit, 1 write), else `service`.
service_io:
        test eax, eax
        jz sys_exit
        cmp eax, 1
        je sys_write
service:                                # calls without I/O: eax = 2 event count
        cmp eax, 2
        jne 1f
        mov eax, dword ptr [rip + event_count]
        ret
1:      mov rax, -1
        ret

sys_write:                              # rsi bytes at rdi to COM1; returns rax = rsi
        push rdi
        push rsi
        push rdx
1:      test rsi, rsi
        jz 3f
        mov dx, COM1 + 5
2:      in al, dx                       # wait for LSR.THRE
        test al, 0x20
        jz 2b
        mov al, byte ptr [rdi]
        mov dx, COM1
        out dx, al
        inc rdi
        dec rsi
        jmp 1b
3:      pop rdx
        pop rsi
        pop rdi
        mov rax, rsi
        ret

sys_exit:
        mov rsi, [rsp + 8]              # the task's RIP (frame under our return address)
        mov edx, edi
        xor r8d, r8d
        mov edi, (5 << 16) | (3 << 8)
        call report
        mov eax, edx
        out DEBUG_EXIT, al
        hlt

unexpected:                             # any other vector: report it from ring 0 and stop
        mov edi, (1 << 16) | 0xff
        mov rsi, [rsp]
        xor edx, edx
        xor r8d, r8d
        call report
kernel_fault:
        hlt
        jmp kernel_fault

# ---- the ring-3 task --------------------------------------------------------------
task:
        lea r15, [rip + task_end]       # resume here after an unplanned fault
# >>> experiments (labkit.rings.rings_guest can replace the lines up to "<<<")
        mov eax, 1                      # write(message) with int 0x80
        lea rdi, [rip + message]
        mov esi, message_end - message
        int 0x80
        mov eax, 2                      # event count with syscall
        syscall
        lea r15, [rip + 1f]             # privileged: each raises #GP
        cli
1:      lea r15, [rip + 1f]
        mov rax, cr3
1:      lea r15, [rip + 1f]
        hlt
1:      lea r15, [rip + 1f]             # reads and writes the kernel forbids: #PF
        mov rax, [SECRET]               # read a supervisor page:   P=1 W=0 U=1
1:      lea r15, [rip + 1f]
        mov byte ptr [SECRET], 1        # write a supervisor page:  P=1 W=1 U=1
1:      lea r15, [rip + 1f]
        mov byte ptr [READ_ONLY], 1     # write a read-only page:   P=1 W=1 U=1
1:      lea r15, [rip + 1f]
        mov rax, [0x40000000]           # beyond the mapped 1 GiB:  P=0 W=0 U=1
1:
# <<< experiments
task_end:
        mov eax, 0                      # exit(0) with int 0x80
        xor edi, edi
        int 0x80
        jmp task_end

        .balign 8
gdtr:
        .word gdt_end - gdt - 1
        .quad gdt
idtr:
        .word 256 * 16 - 1
        .quad IDT
event_count:
        .long 0
message:
        .ascii "hello from ring 3\n"
message_end:
        .balign 8
gdt:
        .quad 0                         # 0x00 null
        .quad 0x00af9b000000ffff        # 0x08 kernel code, 64-bit
        .quad 0x00cf93000000ffff        # 0x10 kernel data
        .quad 0x00cffb000000ffff        # 0x18 user code, 32-bit (STAR's base)
        .quad 0x00cff3000000ffff        # 0x20 user data
        .quad 0x00affb000000ffff        # 0x28 user code, 64-bit
        .quad 0x0000890100000067        # 0x30 TSS at 0x10000, limit 0x67, available
        .quad 0                         #      (upper half of the 16-byte TSS descriptor)
gdt_end:
