# fault64: an ordinary fault, caught. ud2 raises #UD (vector 6); labkit's default
# IDT sends it to the fault stub for vector 6, which writes 6 to FAULT_PORT and
# halts: labkit reports status "fault" with vector 6 and the faulting RIP (0x8005).

        mov eax, 0x1234                 # something to see in the registers at the fault
        ud2
        hlt
