# exit64: the smallest way out. Writes exit code 42 to the debug-exit port
# (labkit.x86.layout.DEBUG_EXIT_PORT): labkit ends the run with status "exited"
# and exit code 42. One port-I/O exit, no console output.

        .equ DEBUG_EXIT, 0xF4

        mov eax, 42
        out DEBUG_EXIT, al
        hlt                             # not reached: the write ends the run
