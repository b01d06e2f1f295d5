# triplefault64: a fault that cannot be delivered. Loads an IDT with limit 0, so
# no gate exists; ud2 raises #UD (6), whose delivery raises #GP, then #DF, which
# cannot be delivered either: a triple fault. The CPU shuts down (KVM_EXIT_SHUTDOWN);
# labkit reports status "shutdown". On bare metal this resets the machine.

        lidt [empty_idtr]
        ud2

        .balign 8
empty_idtr:
        .word 0                         # limit 0: no gates at all
        .quad 0                         # base
