# pagingkernel64: a tiny 64-bit ring-0 kernel that really uses paging (Intel SDM vol. 3A,
# chapter 4): run natively and deprivileged under a monitor with shadow page tables
# (labkit.monitor.shadow). It builds two address spaces (processes A and B) whose kernel
# half is one shared page directory, switches CR3 between them, maps, remaps and unmaps
# pages, makes one read-only, pages memory in on demand from its #PF handler, and uses
# invlpg after every edit. Then it makes EDITS random page-table edits (an LCG seeded by
# SEED: random entry, frame, present and writable bits), each followed by a random read
# or write and a read of the entry back (so the accessed and dirty bits the CPU set are
# part of the result), and prints a hash of everything it observed.
#
# Every store into a live page table goes through set_entry (one `mov [rdi], rax`), which
# counts it once the first CR3 is loaded: the last line but one prints that count, which
# a monitor must match with the page-table writes it trapped.
#
# Physical memory (identity-mapped by a 2 MiB page in the shared kernel half):
#   0x100000 PML4 A, 0x101000 PDPT A, 0x102000 PD (kernel half, shared), 0x103000 PD A
#   for 1 GiB..2 GiB, 0x104000 PT A (the window at 0x40000000), 0x105000 PML4 B,
#   0x106000 PDPT B, 0x108000 PD B, 0x109000 PT B; frames from 0x110000.
# The window: 0x40000000 one page per process, 0x40001000 and 0x40002000 remapped and
# protected, 0x40010000.. paged in on demand, 0x40020000..0x4003ffff random edits.
# The first 2 MiB of virtual addresses below 0x4000, 0x6e000-0x70000 and the top 256 KiB
# of RAM are never touched (a monitor keeps them for itself).

        .equ COM1, 0x3F8
        .equ LSR, COM1 + 5
        .equ LSR_THRE, 0x20
        .equ KERNEL_CS, 0x08
        .equ PML4_A, 0x100000
        .equ PDPT_A, 0x101000
        .equ PD_KERNEL, 0x102000
        .equ PD_A, 0x103000
        .equ PT_A, 0x104000
        .equ PML4_B, 0x105000
        .equ PDPT_B, 0x106000
        .equ PD_B, 0x108000
        .equ PT_B, 0x109000
        .equ TABLES_END, 0x10A000
        .equ FRAME, 0x110000              # frame n at FRAME + n * 0x1000
        .equ WINDOW, 0x40000000
        .equ DEMAND, WINDOW + 0x10000     # 16 pages paged in on demand
        .equ DEMAND_PAGES, 16
        .equ RANDOM, WINDOW + 0x20000     # 32 pages edited at random
        .equ RANDOM_FRAMES, 4             # frames 4..11 back them
        .equ PRESENT, 1
        .equ WRITABLE, 2
        .equ LARGE, 0x80
        .equ PTE_FLAGS_MASK, 0xFFF

start:
        jmp boot
        .org 8
        .ascii "PTEDITS "                 # magic: the number of random edits and the seed follow
edits:  .quad 100
seed:   .quad 1

boot:
        lgdt [rip + gdt_pointer]
        lea rdi, [rip + idt]
        lea rax, [rip + unexpected]
        mov ecx, 32
fill_idt:
        call set_gate
        add rdi, 16
        loop fill_idt
        lea rdi, [rip + idt + 14 * 16]
        lea rax, [rip + pf_handler]
        call set_gate
        lidt [rip + idt_pointer]

        # -- build the two address spaces (not yet live: these stores are not counted)
        mov edi, PML4_A
        mov ecx, (TABLES_END - PML4_A) / 8
        xor eax, eax
        rep stosq
        mov edi, PML4_A
        mov eax, PDPT_A | PRESENT | WRITABLE
        call set_entry
        mov edi, PDPT_A
        mov eax, PD_KERNEL | PRESENT | WRITABLE
        call set_entry
        mov edi, PDPT_A + 8
        mov eax, PD_A | PRESENT | WRITABLE
        call set_entry
        mov edi, PD_KERNEL
        mov eax, 0 | PRESENT | WRITABLE | LARGE    # 0..2 MiB identity, one 2 MiB page
        call set_entry
        mov edi, PD_A
        mov eax, PT_A | PRESENT | WRITABLE
        call set_entry
        mov edi, PT_A
        mov eax, FRAME + 0x0000 | PRESENT | WRITABLE
        call set_entry
        mov edi, PT_A + 8
        mov eax, FRAME + 0x2000 | PRESENT | WRITABLE
        call set_entry
        mov edi, PT_A + 16
        mov eax, FRAME + 0x3000 | PRESENT | WRITABLE
        call set_entry
        mov edi, PML4_B
        mov eax, PDPT_B | PRESENT | WRITABLE
        call set_entry
        mov edi, PDPT_B
        mov eax, PD_KERNEL | PRESENT | WRITABLE    # the kernel half is shared
        call set_entry
        mov edi, PDPT_B + 8
        mov eax, PD_B | PRESENT | WRITABLE
        call set_entry
        mov edi, PD_B
        mov eax, PT_B | PRESENT | WRITABLE
        call set_entry
        mov edi, PT_B
        mov eax, FRAME + 0x1000 | PRESENT | WRITABLE
        call set_entry
        mov eax, PML4_A
        mov cr3, rax
        mov byte ptr [rip + live], 1      # from here every page-table store is counted
        lea rsi, [rip + msg_boot]
        call puts

        # -- two processes, one virtual address, two pages
        mov rbx, WINDOW
        mov qword ptr [rbx], 0xa1
        mov eax, PML4_B
        mov cr3, rax
        mov qword ptr [rbx], 0xb2
        mov eax, PML4_A
        mov cr3, rax
        lea rsi, [rip + msg_a]
        call puts
        mov rax, [rbx]
        call put_hex
        mov eax, PML4_B
        mov cr3, rax
        lea rsi, [rip + msg_b]
        call puts
        mov rax, [rbx]
        call put_hex
        call newline
        mov eax, PML4_A
        mov cr3, rax

        # -- remap a page, invlpg, read it back through the new mapping
        mov rbx, WINDOW + 0x1000
        mov qword ptr [rbx], 0xc3
        mov rax, [rbx]                    # the translation is now cached
        mov edi, PT_A + 8
        mov eax, FRAME + 0x1000 | PRESENT | WRITABLE   # B's page
        call set_entry
        invlpg [rbx]
        lea rsi, [rip + msg_remap_invlpg]
        call puts
        mov rax, [rbx]
        call put_hex
        call newline
        mov edi, PT_A + 8
        mov eax, FRAME + 0x2000 | PRESENT | WRITABLE   # back to its own page
        call set_entry
        mov rax, cr3                      # a CR3 reload instead of invlpg
        mov cr3, rax
        lea rsi, [rip + msg_remap_cr3]
        call puts
        mov rax, [rbx]
        call put_hex
        call newline

        # -- unmap it: the read faults
        mov edi, PT_A + 8
        xor eax, eax
        call set_entry
        invlpg [rbx]
        lea rsi, [rip + msg_unmap]
        call puts
        mov rdi, rbx
        call probe_read
        call print_fault

        # -- read-only: the write faults, the read does not
        mov rbx, WINDOW + 0x2000
        mov qword ptr [rbx], 0xd4
        mov edi, PT_A + 16
        mov eax, FRAME + 0x3000 | PRESENT
        call set_entry
        invlpg [rbx]
        lea rsi, [rip + msg_readonly]
        call puts
        mov rdi, rbx
        mov esi, 0xee
        call probe_write
        call print_fault
        lea rsi, [rip + msg_read_back]
        call puts
        mov rax, [rbx]
        call put_hex
        call newline

        # -- demand paging: four pages that are not there until touched
        mov rbx, DEMAND
        xor ecx, ecx
demand_write:
        lea rax, [rcx + 1]
        mov [rbx + rcx * 8], rax          # page rcx, at offset 8 * rcx (rcx * 0x1000 + 8 * rcx)
        add rbx, 0xFF8
        inc ecx
        cmp ecx, 4
        jb demand_write
        mov rbx, DEMAND
        xor ecx, ecx
        xor edx, edx
demand_read:
        add rdx, [rbx + rcx * 8]
        add rbx, 0xFF8
        inc ecx
        cmp ecx, 4
        jb demand_read
        lea rsi, [rip + msg_demand]
        call puts
        mov rax, [rip + paged_in]
        call put_hex
        lea rsi, [rip + msg_sum]
        call puts
        mov rax, rdx
        call put_hex
        call newline

        # -- random edits, each followed by a random access and a read of the entry
        mov r12, [rip + edits]
        mov r13, [rip + seed]
        xor r14d, r14d                    # hash
        xor r15d, r15d                    # edits made
random_edit:
        cmp r15, r12
        jae random_done
        call random                       # rax = 31 random bits
        mov rbx, rax
        and ebx, 31                       # which entry of PT A's 32..63
        mov rdx, rax
        shr rdx, 5
        and edx, 7
        add edx, RANDOM_FRAMES
        shl rdx, 12
        add rdx, FRAME                    # a frame of 4..11
        mov rcx, rax
        shr rcx, 8
        and ecx, 3
        cmp ecx, 3
        setne cl                          # present 3 times in 4
        movzx ecx, cl
        or rdx, rcx
        bt rax, 10
        jnc 1f
        or rdx, WRITABLE
1:      mov rax, rdx
        lea rdi, [PT_A + 0x100 + rbx * 8]
        shl rbx, 12
        add rbx, RANDOM                   # the page that entry maps
        call set_entry
        invlpg [rbx]
        call random                       # the access: which page, read or write
        mov rbx, rax
        and ebx, 31
        shl rbx, 12
        mov rdi, RANDOM
        add rdi, rbx
        mov rbx, rdi
        bt rax, 5
        jc random_write
        call probe_read
        jmp random_observed
random_write:
        mov rsi, r15
        call probe_write
        mov rax, r15
random_observed:
        call mix_observation
        mov rax, rbx                      # the entry after the access: A and D as the CPU left them
        sub rax, RANDOM
        shr rax, 9
        mov rax, [PT_A + 0x100 + rax]
        call mix
        inc r15
        jmp random_edit
random_done:
        lea rsi, [rip + msg_random]
        call puts
        mov rax, r15
        call put_hex
        lea rsi, [rip + msg_faults]
        call puts
        mov rax, [rip + faults]
        call put_hex
        lea rsi, [rip + msg_hash]
        call puts
        mov rax, r14
        call put_hex
        call newline

        lea rsi, [rip + msg_stores]
        call puts
        mov rax, [rip + pte_stores]
        call put_hex
        call newline
        lea rsi, [rip + msg_done]
        call puts
        cli
halt:
        hlt
        jmp halt

# -- page tables and probes -------------------------------------------------------------

set_entry:                                # rdi = entry address, rax = value: the one page-table store
        mov [rdi], rax
        cmp byte ptr [rip + live], 0
        je 1f
        inc qword ptr [rip + pte_stores]
1:      ret

probe_read:                               # rdi = address -> rax = value, rdx = 0; or rdx = 1 (faulted)
        lea rax, [rip + probe_failed]
        mov [rip + recovery], rax
        mov rax, [rdi]
        mov qword ptr [rip + recovery], 0
        xor edx, edx
        ret
probe_write:                              # rdi = address, rsi = value -> rdx = 0; or rdx = 1 (faulted)
        lea rax, [rip + probe_failed]
        mov [rip + recovery], rax
        mov [rdi], rsi
        mov qword ptr [rip + recovery], 0
        xor edx, edx
        ret
probe_failed:
        mov edx, 1
        ret

print_fault:                              # rdx = 1 after a faulted probe
        test edx, edx
        jz 1f
        lea rsi, [rip + msg_fault_cr2]
        call puts
        mov rax, [rip + fault_cr2]
        call put_hex
        lea rsi, [rip + msg_error_code]
        call puts
        mov rax, [rip + fault_code]
        call put_hex
        jmp newline
1:      lea rsi, [rip + msg_no_fault]
        jmp puts

mix_observation:                          # rax = value read or written, rdx = 1 if it faulted
        test edx, edx
        jz mix
        mov rax, [rip + fault_cr2]
        call mix
        mov rax, [rip + fault_code]
mix:                                      # r14 = r14 * 31 + rax
        imul r14, r14, 31
        add r14, rax
        ret

random:                                   # r13 = LCG state -> rax = its top 31 bits
        mov rax, 6364136223846793005
        imul r13, rax
        mov rax, 1442695040888963407
        add r13, rax
        mov rax, r13
        shr rax, 33
        ret

# -- the page-fault handler: a probe's fault, or a page to bring in --------------------

pf_handler:                               # frame: error code, RIP, CS, RFLAGS, RSP, SS
        push rax
        push rcx
        push rdi
        mov rdi, [rip + recovery]
        test rdi, rdi
        jz pf_demand
        mov rax, cr2
        mov [rip + fault_cr2], rax
        mov rax, [rsp + 24]
        mov [rip + fault_code], rax
        mov [rsp + 32], rdi               # resume at the probe's recovery point
        mov qword ptr [rip + recovery], 0
        inc qword ptr [rip + faults]
        jmp pf_return
pf_demand:
        mov rax, cr2
        mov rdi, rax
        sub rdi, DEMAND
        cmp rdi, DEMAND_PAGES * 0x1000
        jae pf_unexpected
        test byte ptr [rsp + 24], PRESENT
        jnz pf_unexpected
        mov rdi, [rip + next_frame]       # a free frame, zeroed through the identity map
        add qword ptr [rip + next_frame], 0x1000
        push rdi
        mov ecx, 512
        xor eax, eax
        rep stosq
        pop rax
        or rax, PRESENT | WRITABLE
        mov rdi, cr2
        sub rdi, DEMAND
        shr rdi, 12
        lea rdi, [PT_A + 0x80 + rdi * 8]  # PT A entries 16..31
        call set_entry
        mov rax, cr2
        invlpg [rax]
        inc qword ptr [rip + paged_in]
pf_return:
        pop rdi
        pop rcx
        pop rax
        add rsp, 8                        # drop the error code
        iretq
pf_unexpected:
        lea rsi, [rip + msg_pf_unexpected]
        call puts
        mov rax, cr2
        call put_hex
        call newline
        cli
        jmp halt

unexpected:
        lea rsi, [rip + msg_unexpected]
        call puts
        cli
        jmp halt

# -- helpers: set_gate, puts, put_hex, newline (as in minikernel64) -------------------

        .include "idt_gate.inc"            # set_gate: rdi = gate, rax = handler; clobbers rdx

newline:
        mov al, 10
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

msg_boot:          .asciz "paging: address spaces A and B built (kernel half shared), CR3 = A\n"
msg_a:             .asciz "A reads 0x40000000: "
msg_b:             .asciz ", B reads 0x40000000: "
msg_remap_invlpg:  .asciz "remap 0x40001000 to B's page, invlpg, read: "
msg_remap_cr3:     .asciz "map it back, reload CR3, read: "
msg_unmap:         .asciz "unmap 0x40001000, invlpg, read: "
msg_readonly:      .asciz "0x40002000 read-only, write: "
msg_read_back:     .asciz "  read: "
msg_fault_cr2:     .asciz "#PF cr2 "
msg_error_code:    .asciz ", error code "
msg_no_fault:      .asciz "no fault\n"
msg_demand:        .asciz "demand paging: pages brought in "
msg_sum:           .asciz ", sum "
msg_random:        .asciz "random edits "
msg_faults:        .asciz ", faults "
msg_hash:          .asciz ", hash "
msg_stores:        .asciz "page-table stores while paging: "
msg_done:          .asciz "paging: done, halting\n"
msg_pf_unexpected: .asciz "paging: unexpected #PF at "
msg_unexpected:    .asciz "paging: unexpected exception, halting\n"

        .balign 8
live:       .quad 0
pte_stores: .quad 0
recovery:   .quad 0
fault_cr2:  .quad 0
fault_code: .quad 0
faults:     .quad 0
paged_in:   .quad 0
next_frame: .quad FRAME + 0x10000         # frames 16.. for demand paging
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF          # 0x08: 64-bit code, DPL 0
        .quad 0x00CF93000000FFFF          # 0x10: data, DPL 0
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt
idt_pointer:
        .word 32 * 16 - 1
        .quad idt
        .balign 16
idt:
        .fill 32 * 16, 1, 0
