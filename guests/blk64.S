# blk64: a virtio-blk driver (virtio 1.x, 5.2) that writes a pattern to the disk, flushes, reads it back and
# verifies it, then prints a checksum of what it read: "blk64 checksum 0123456789abcdef\n" on the UART.
# Finds the virtio-mmio device at 0x3FFFE000 (labkit.x86.layout.VIRTIO_BLK_MMIO_BASE; device ID 2), resets it,
# ACKNOWLEDGE, DRIVER, accepts VIRTIO_F_VERSION_1 only, FEATURES_OK, sets up queue 0 (requestq) with 16
# entries, DRIVER_OK (3.1.1, 4.2.3), and reads the capacity (config space, le64 sectors).
# Each request is one chain of three descriptors (5.2.6): the 16-byte header (type, reserved, sector;
# device-readable), the data (device-readable for OUT, device-writable for IN) and the status byte
# (device-writable). One request is in flight at a time; the driver notifies with a 16-bit write of the
# queue index to port 0xF8 and polls used.idx (the device may answer later: a full disk pauses the VM and
# the request is answered when it runs again).
# The data of sector s, qword j (0..63) is ((64 * s + j) * 0x9E3779B97F4A7C15) ^ seed: the same whoever writes
# it, so the order of writes to one sector does not matter and the read-back is checked qword by qword.
# The checksum: c = rol(c, 1) + qword, over every qword read, in order.
# Parameters (written by the host into guest RAM before the run; labkit.virtio.blk.blk_parameters):
#   0x80000 u32 magic "BKPB" (0x42504B42)   0x80004 u32 pattern (0 sequential, 1 random, 2 rewrite)
#   0x80008 u32 sectors per request (1..128)   0x8000c u32 requests (>= 1)   0x80010 u32 seed (not 0)
# Sequential: request i at sector i*k. Random: at k * (xorshift64 % (capacity / k)). Rewrite: at k * (i % 4).
# Without a parameter block: sequential, 8 requests of 8 sectors, seed 1.
# Exit code (debug-exit port): 0 verified, 1 bad parameters (or the disk too small for them), 2 no usable
# virtio-blk device, 3 the device set DEVICE_NEEDS_RESET, 4 a request's status was not OK, 5 a qword read
# back differs from what was written (the sector is printed). Ring 0, long mode.

        .equ MMIO, 0x3FFFE000           # labkit.x86.layout.VIRTIO_BLK_MMIO_BASE
        .equ NOTIFY, 0xF8               # layout.VIRTIO_BLK_NOTIFY_PORT
        .equ DEBUG_EXIT, 0xF4
        .equ COM1, 0x3F8
        .equ PARAMS, 0x80000
        .equ MAGIC, 0x42504B42
        .equ DESC, 0x81000
        .equ AVAIL, 0x82000
        .equ USED, 0x83000
        .equ HDR, 0x84000
        .equ STATUS_BYTE, 0x84010
        .equ BUFFER, 0x100000
        .equ QSIZE, 16
        .equ MIX, 0x9E3779B97F4A7C15
        .equ T_IN, 0
        .equ T_OUT, 1
        .equ T_FLUSH, 4
        .include "virtio_mmio.inc"         # the transport's registers and status bits

start:
        mov esi, PARAMS
        cmp dword ptr [rsi], MAGIC
        je 1f
        mov esi, offset defaults
1:
        mov eax, [rsi + 4]
        mov [pattern], eax
        cmp eax, 2
        ja bad_params
        mov eax, [rsi + 8]
        mov [sectors], eax
        test eax, eax
        jz bad_params
        cmp eax, 128
        ja bad_params
        mov eax, [rsi + 12]
        mov [count], eax
        test eax, eax
        jz bad_params
        mov eax, [rsi + 16]
        mov [seed], rax
        test eax, eax
        jz bad_params

        # -- device initialisation (3.1.1, 4.2.3) --
        mov ebp, MMIO
        mov ebx, 2                                      # a block device
        xor r12d, r12d                                  # its queue 0
        mov r13d, DESC
        call init_device
        mov eax, [rbp + R_CAPACITY_HIGH]
        shl rax, 32
        mov ecx, [rbp + R_CAPACITY_LOW]
        or rax, rcx
        xor edx, edx
        mov ecx, [sectors]
        div rcx                                         # extents of k sectors on the disk
        test rax, rax
        jz bad_params
        mov [extents], rax
        mov ecx, [count]                                # sequential needs count extents, rewrite 4
        cmp dword ptr [pattern], 0
        je 2f
        mov ecx, 4
        cmp dword ptr [pattern], 2
        jne 3f
2:
        cmp rcx, rax
        ja bad_params
3:
        xor r15d, r15d                                  # avail.idx, free-running

        # -- pass 1: write every request's extent --
        mov rbx, [seed]                                 # the random pattern's state
        xor r12d, r12d                                  # request number
write_next:
        call pick                                       # rdx = first sector
        mov rsi, rdx
        call fill
        mov eax, T_OUT
        xor r8d, r8d                                    # data device-readable
        call request
        inc r12d
        cmp r12d, [count]
        jb write_next
        mov eax, T_FLUSH
        xor edx, edx
        call request_no_data

        # -- pass 2: read every extent back, check it, add it to the checksum --
        mov rbx, [seed]
        xor r12d, r12d
        xor r14d, r14d                                  # checksum
read_next:
        call pick
        push rdx
        mov edi, BUFFER                                 # clear the buffer: the device must fill it
        mov ecx, [sectors]
        shl ecx, 6
        xor eax, eax
        rep stosq
        pop rdx
        push rdx
        mov eax, T_IN
        mov r8d, 2                                      # data device-writable
        call request
        pop rsi
        call verify
        inc r12d
        cmp r12d, [count]
        jb read_next

        lea rsi, [msg_checksum]
        call puts
        mov rax, r14
        call puthex
        mov al, 10
        call putc
        test dword ptr [rbp + R_STATUS], NEEDS_RESET
        jnz needs_reset
        xor eax, eax
        out DEBUG_EXIT, al
        hlt

# rdx = the first sector of request r12 (rbx: the random state, advanced for the random pattern).
pick:
        mov eax, [pattern]
        cmp eax, 1
        je 1f
        mov rax, r12                                    # sequential: i; rewrite: i % 4
        cmp dword ptr [pattern], 2
        jne 2f
        and eax, 3
        jmp 2f
1:
        mov rax, rbx                                    # xorshift64 (Marsaglia)
        shl rax, 13
        xor rbx, rax
        mov rax, rbx
        shr rax, 7
        xor rbx, rax
        mov rax, rbx
        shl rax, 17
        xor rbx, rax
        mov rax, rbx
        xor edx, edx
        div qword ptr [extents]
        mov rax, rdx
2:
        mov ecx, [sectors]
        mul rcx
        mov rdx, rax
        ret

# The pattern of k sectors from sector rsi into BUFFER. Uses rax, rcx, rdi, r9, r10.
fill:
        mov rdi, BUFFER
        mov r9, rsi
        shl r9, 6                                       # first qword index on the disk
        mov ecx, [sectors]
        shl ecx, 6
        mov r10, MIX
1:
        mov rax, r9
        imul rax, r10
        xor rax, [seed]
        mov [rdi], rax
        add rdi, 8
        inc r9
        dec ecx
        jnz 1b
        ret

# Check BUFFER against the pattern of sector rsi onwards; fold each qword into r14. Uses rax, rcx, rdi, r9, r10.
verify:
        mov rdi, BUFFER
        mov r9, rsi
        shl r9, 6
        mov ecx, [sectors]
        shl ecx, 6
        mov r10, MIX
1:
        mov rax, r9
        imul rax, r10
        xor rax, [seed]
        cmp rax, [rdi]
        jne mismatch
        rol r14, 1
        add r14, rax
        add rdi, 8
        inc r9
        dec ecx
        jnz 1b
        ret
mismatch:
        lea rsi, [msg_mismatch]
        call puts
        mov rax, r9
        shr rax, 6
        call puthex
        mov al, 10
        call putc
        mov eax, 5
        out DEBUG_EXIT, al
        hlt

# One request of type eax at sector rdx with k sectors of data at BUFFER (r8: 0 device-readable, 2 writable).
request:
        mov ecx, [sectors]
        shl ecx, 9
        mov qword ptr [DESC + 16], BUFFER               # desc[1]: the data
        mov [DESC + 16 + 8], ecx
        or r8d, 1                                       # NEXT
        mov [DESC + 16 + 12], r8w
        mov word ptr [DESC + 16 + 14], 2
        mov word ptr [DESC + 14], 1                     # desc[0].next = the data
        jmp 1f
request_no_data:
        mov word ptr [DESC + 14], 2                     # desc[0].next = the status
1:
        mov [HDR], eax                                  # header: type, reserved, sector
        mov dword ptr [HDR + 4], 0
        mov [HDR + 8], rdx
        mov byte ptr [STATUS_BYTE], 0xFF
        mov qword ptr [DESC], HDR                       # desc[0]: the header, device-readable
        mov dword ptr [DESC + 8], 16
        mov word ptr [DESC + 12], 1                     # NEXT
        mov qword ptr [DESC + 32], STATUS_BYTE          # desc[2]: the status, device-writable, last
        mov dword ptr [DESC + 32 + 8], 1
        mov dword ptr [DESC + 32 + 12], 2               # WRITE, next 0
        mov eax, r15d
        and eax, QSIZE - 1
        mov word ptr [AVAIL + 4 + rax * 2], 0           # avail.ring[idx % size] = descriptor 0
        inc r15d
        mov [AVAIL + 2], r15w                           # avail.idx: visible (x86 keeps stores in order)
        mov dx, NOTIFY
        xor eax, eax
        out dx, ax                                      # notify queue 0
        mov ecx, 4096
2:
        movzx eax, word ptr [USED + 2]
        cmp ax, r15w
        je 3f
        pause
        dec ecx
        jnz 2b
        test dword ptr [rbp + R_STATUS], NEEDS_RESET
        jnz needs_reset
        mov ecx, 4096
        jmp 2b
3:
        cmp byte ptr [STATUS_BYTE], 0
        jne request_failed
        ret

# The UART: a string at rsi (NUL-terminated), a character in al, rax as 16 hex digits.
puts:
        lodsb
        test al, al
        jz 1f
        call putc
        jmp puts
1:
        ret
putc:
        push rdx
        push rax
        mov dx, COM1 + 5
1:
        in al, dx
        test al, 0x20                                   # THR empty
        jz 1b
        pop rax
        mov dx, COM1
        out dx, al
        pop rdx
        ret
puthex:
        mov ecx, 16
1:
        rol rax, 4
        push rax
        and eax, 15
        mov al, [hexdigits + rax]
        call putc
        pop rax
        dec ecx
        jnz 1b
        ret

        .include "virtio_init.inc"         # init_device: rbp device, ebx its ID, r12 queue, r13 its memory

        .include "virtio_exits.inc"        # bad_params 1, no_device 2, needs_reset 3: exit codes
request_failed:
        mov eax, 4
        out DEBUG_EXIT, al
        hlt

        .align 8
defaults:
        .long MAGIC, 0, 8, 8, 1
seed:
        .quad 1
extents:
        .quad 0
pattern:
        .long 0
sectors:
        .long 0
count:
        .long 0
hexdigits:
        .ascii "0123456789abcdef"
msg_checksum:
        .asciz "blk64 checksum "
msg_mismatch:
        .asciz "blk64 mismatch at sector "
