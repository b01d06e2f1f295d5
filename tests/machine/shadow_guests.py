"""Guest kernels for the shadow-paging tests under binary translation (tests/machine/test_shadow_bt.py)."""

REMAPPED_CODE = r"""
# A kernel that calls the code at one virtual address while it changes what is there: remapped to another
# page with invlpg, rewritten twice through another virtual address, remapped with a CR3 reload, then unmapped
# (the call's instruction fetch faults: its #PF handler returns to the caller), then calls an instruction whose
# last bytes would lie on an unmapped page. Each call prints the digit the code returns; the handler makes it
# 'F', then come the error code and whether CR2 (and the fault's RIP) were right.
# It edits labkit's boot page table (4 KiB pages for the first 2 MiB at 0x7000).
        .equ PT, 0x7000
        .equ X, 0x120000
        .equ X_ENTRY, PT + (X >> 12) * 8
        .equ P1, 0x110000
        .equ P2, 0x111000
start:
        lea rdi, [rip + idt + 14 * 16]
        lea rax, [rip + pf_handler]
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], 0x08
        mov word ptr [rdi + 4], 0x8E00
        mov rdx, rax
        shr rdx, 16
        mov word ptr [rdi + 6], dx
        shr rdx, 16
        mov dword ptr [rdi + 8], edx
        mov dword ptr [rdi + 12], 0
        lidt [rip + idt_pointer]
        mov rax, 0x0000C300000001B8       # mov eax, 1 ; ret
        mov [P1], rax
        mov rax, 0x0000C300000002B8       # mov eax, 2 ; ret
        mov [P2], rax
        mov rbx, X
        mov rax, P1 | 3
        mov [X_ENTRY], rax
        invlpg [rbx]
        call rbx
        call print                        # 1
        mov rax, P2 | 3
        mov [X_ENTRY], rax
        invlpg [rbx]
        call rbx
        call print                        # 2: remapped, invlpg
        mov byte ptr [P2 + 1], 3
        call rbx
        call print                        # 3: rewritten through P2's own address (a mov)
        inc byte ptr [P2 + 1]
        call rbx
        call print                        # 4: rewritten again (not a mov: run with its page open)
        mov rax, P1 | 3
        mov [X_ENTRY], rax
        mov rax, cr3
        mov cr3, rax
        call rbx
        call print                        # 1: remapped, CR3 reloaded
        mov qword ptr [X_ENTRY], 0
        invlpg [rbx]
        call rbx
        call print                        # F: the fetch faulted
        mov rax, r13
        call print                        # the #PF error code
        xor eax, eax
        cmp r14, rbx
        sete al
        call print                        # 1: CR2 held the address
        mov rax, P1 | 3
        mov [X_ENTRY], rax                # X -> P1 again, the page after it unmapped
        mov qword ptr [X_ENTRY + 8], 0
        invlpg [rbx]
        lea rcx, [rbx + 0x1000]
        invlpg [rcx]
        mov word ptr [P1 + 0xFFE], 0x05B8 # mov eax, 5: its last three bytes would lie on the unmapped page
        lea rcx, [rbx + 0xFFE]
        call rcx
        call print                        # F: the fetch of its bytes on the next page faulted
        xor eax, eax
        lea rcx, [rbx + 0x1000]
        cmp r14, rcx
        sete al
        call print                        # 1: CR2 is the first address of the unmapped page
        xor eax, eax
        lea rcx, [rbx + 0xFFE]
        cmp r15, rcx
        sete al
        call print                        # 1: the fault's RIP is where the instruction starts
        hlt
print:
        add al, '0'
        mov dx, 0x3F8
        out dx, al
        ret
pf_handler:
        pop r13                           # the error code
        mov r14, cr2
        mov r15, [rsp]                    # the faulting RIP
        mov rax, [rsp + 24]               # return to the caller: the frame's RIP := [its RSP], RSP += 8
        mov rcx, [rax]
        mov [rsp], rcx
        add qword ptr [rsp + 24], 8
        mov eax, 'F' - '0'
        iretq
idt_pointer:
        .word 32 * 16 - 1
        .quad idt
        .balign 16
idt:
        .fill 32 * 16, 1, 0
"""
"""Its console natively and under either monitor with shadow paging: ``12341F01F11``."""
