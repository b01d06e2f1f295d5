# wildwrite64: a faulty guest that writes random qwords all over its own address space.
# Ring 0 draws addresses and values from xorshift64 (seed at offset 8) and stores one qword
# per step, with addresses spread over the whole range its page tables map, [0, 1 GiB):
# most land above RAM (an MMIO exit, ignored), some in its own RAM: the IVT, labkit's fault
# stubs, GDT, IDT, TSS, page tables, its own code and stack.  It runs until it breaks
# itself; how it breaks depends on which structure it hits first (a triple fault when its
# IDT or page tables are gone, a fault, or a wild jump), and if it never does, the run ends
# by its timeout.  One step in 8 goes to RAM below 2 MiB, so the damage comes quickly.

        .equ RAM_MASK, 0x1FFFF8         # an aligned qword in the first 2 MiB
        .equ MAPPED_MASK, 0x3FFFFFF8    # an aligned qword in [0, 1 GiB)

        jmp start
        .balign 8
seed:   .quad 0x9E3779B97F4A7C15
start:
        mov rax, [seed]
        xor ecx, ecx                    # ecx = step
step:
        mov rdx, rax                    # xorshift64 (Marsaglia): 13, 7, 17
        shl rdx, 13
        xor rax, rdx
        mov rdx, rax
        shr rdx, 7
        xor rax, rdx
        mov rdx, rax
        shl rdx, 17
        xor rax, rdx
        mov rdi, rax
        and rdi, MAPPED_MASK
        test ecx, 7
        jnz 1f
        and rdi, RAM_MASK
1:      mov [rdi], rax
        inc ecx
        jmp step
