# ring_console64: writes N bytes of a numbered test text through a virtio console's split virtqueue.
# The ring half of labkit.virtio.measure_console (uart_console64 prints the same text byte-wise).
# A small virtio 1.x driver: finds the virtio-mmio device (4.2.3.1), resets it,
# ACKNOWLEDGE, DRIVER, accepts VIRTIO_F_VERSION_1 only, FEATURES_OK, sets up queue 1 (the console's
# transmitq, 5.3.2) with 256 entries (4.2.3.2), DRIVER_OK (3.1.1). Then, per batch: fills up to
# `batch` buffers of B bytes, one descriptor each (2.7.5), puts their heads on the available ring,
# stores avail.idx (2.7.13) and notifies once: a 16-bit write of the queue index to port 0xF6.
# It waits until used.idx catches up with avail.idx (the device may answer at once, or later when
# KVM_IOEVENTFD took the notification in the kernel) and reuses the buffers for the next batch.
# Parameters (written by the host into guest RAM before the run; labkit.virtio.measure):
#   0x80000 u32 magic "VQPB" (0x42505156)   0x80004 u32 total bytes N   0x80008 u32 bytes per buffer B
#   0x8000c u32 buffers per notification (1..256)   0x80010 u32 times each batch is posted (1 = normal)
# The queue: descriptor table 0x81000, available ring 0x82000, used ring 0x83000; buffers from 0x100000.
# Without a parameter block (magic missing): N = 1024, B = 256, 4 buffers per notification.
# Exit code (debug-exit port): 0 done, 1 bad parameters, 2 no usable virtio console, 3 the device
# set DEVICE_NEEDS_RESET. Ring 0, long mode; under PVM every instruction runs in KVM's emulator.

        .equ MMIO, 0x3FFFF000           # labkit.x86.layout.VIRTIO_MMIO_BASE
        .equ NOTIFY, 0xF6               # layout.VIRTIO_NOTIFY_PORT
        .equ DEBUG_EXIT, 0xF4
        .equ PARAMS, 0x80000            # labkit.virtio.measure.PARAMS_ADDRESS
        .equ MAGIC, 0x42505156
        .equ DESC, 0x81000
        .equ AVAIL, 0x82000
        .equ USED, 0x83000
        .equ BUFFERS, 0x100000
        .equ QSIZE, 256
        .equ TRANSMITQ, 1
        .equ LINE, 64
        .include "virtio_mmio.inc"         # the transport's registers and status bits

start:
        mov esi, PARAMS
        cmp dword ptr [rsi], MAGIC
        je 1f
        mov esi, offset defaults        # no parameter block: 1 KiB in 256-byte buffers, 4 per notification
1:
        mov r12d, [rsi + 4]             # bytes left to write
        mov r13d, [rsi + 8]             # bytes per buffer
        mov r14d, [rsi + 12]            # buffers per notification
        test r13, r13
        jz bad_params
        test r14, r14
        jz bad_params
        cmp r14, QSIZE
        ja bad_params
        mov eax, [rsi + 16]
        test eax, eax
        jz bad_params
        mov [repeat], eax

        # -- device initialisation (3.1.1, 4.2.3) --
        mov ebp, MMIO
        push r12
        push r13
        mov ebx, 3                      # a console
        mov r12d, TRANSMITQ             # its transmitq
        mov r13d, DESC
        call init_device
        pop r13
        pop r12

        # -- the transfer --
        xor ebx, ebx                    # position in the current line
        xor r15d, r15d                  # avail.idx, free-running (16 bits in memory)
next_batch:
        test r12, r12
        jz finish
        mov r8, r14
        imul r8, r13                    # n = min(bytes left, batch * B)
        cmp r8, r12
        cmova r8, r12
        mov edi, BUFFERS
        mov rcx, r8
        call emit                       # the text into the buffers, one after another
        mov r9d, [repeat]               # times to post this batch
post_batch:
        xor ecx, ecx                    # descriptor (and buffer) index
        mov r10d, BUFFERS               # its address
        mov r11, r8                     # bytes not yet described
describe:
        mov rax, r13                    # len = min(B, bytes left)
        cmp rax, r11
        cmova rax, r11
        mov rdx, rcx
        shl rdx, 4
        mov [rdx + DESC], r10           # desc[i].addr
        mov [rdx + DESC + 8], eax       # desc[i].len
        mov dword ptr [rdx + DESC + 12], 0      # flags 0 (device-readable, last of its chain), next 0
        lea esi, [r15 + rcx]
        and esi, QSIZE - 1
        mov [rsi * 2 + AVAIL + 4], cx   # avail.ring[(idx + i) % size] = i
        add r10, rax
        sub r11, rax
        inc ecx
        test r11, r11
        jnz describe
        add r15d, ecx                   # x86 keeps stores in order: descriptors, ring, then idx (2.7.13.3)
        mov [AVAIL + 2], r15w           # avail.idx: the batch is visible
        mov dx, NOTIFY
        mov ax, TRANSMITQ
        out dx, ax                      # one notification for the whole batch
        mov ecx, 4096
wait_used:
        movzx eax, word ptr [USED + 2]
        cmp ax, r15w
        je batch_used
        pause
        dec ecx
        jnz wait_used
        test dword ptr [rbp + R_STATUS], NEEDS_RESET    # not answered yet: a broken device?
        jnz needs_reset
        mov ecx, 4096
        jmp wait_used
batch_used:
        dec r9
        jnz post_batch
        sub r12, r8
        jmp next_batch

finish:
        test dword ptr [rbp + R_STATUS], NEEDS_RESET
        jnz needs_reset
        xor eax, eax
        out DEBUG_EXIT, al
        hlt

        .include "virtio_init.inc"         # init_device: rbp device, ebx its ID, r12 queue, r13 its memory

        .include "virtio_exits.inc"        # bad_params 1, no_device 2, needs_reset 3: exit codes

# Copy rcx bytes of the text to rdi, continuing the current line at rbx. Uses rax, rsi.
emit:
        test rcx, rcx
        jz 5f
        mov eax, LINE
        sub rax, rbx                    # room left in the line
        cmp rax, rcx
        cmova rax, rcx                  # this piece
        lea rsi, [rbx + line]
        add rbx, rax
        sub rcx, rax
        xchg rcx, rax
        rep movsb
        mov rcx, rax
        cmp ebx, LINE
        jne emit
        call next_line
        jmp emit
5:
        ret

# Count the line number (5 ASCII digits at line + 5) up by one; rbx = 0. Uses rax only.
next_line:
        lea rax, [line + 9]
2:
        inc byte ptr [rax]
        cmp byte ptr [rax], '9' + 1
        jne 3f
        mov byte ptr [rax], '0'
        dec rax
        cmp rax, offset line + 5
        jae 2b
3:
        xor ebx, ebx
        ret

defaults:
        .long MAGIC, 1024, 256, 4, 1
repeat:
        .long 1
line:
        .ascii "line 00000 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
