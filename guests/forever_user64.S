# forever_user64: a guest that never stops, in ring 3 (user=True: labkit enters
# ring 3 at the entry point with iretq). The time budget stops it with status
# "timeout". Under PVM ring-3 code runs natively, so this loop spins at full speed.

spin:
        jmp spin
