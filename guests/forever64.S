# forever64: a guest that never stops, in ring 0. labkit's time budget stops it
# with status "timeout". Under PVM each iteration goes through KVM's instruction
# emulator (about 1 us); with VT-x/AMD-V or under Unicorn it runs at full speed.

spin:
        jmp spin
