# backup64: the in-guest backup agent and a disk workload, over virtio-blk (5.2) and a virtio console (5.3).
# The disk holds labkit's tiny file layout (labkit.backup.files, "LKFS" version 1): sector 0 the superblock,
# sectors 1-8 a directory of 32 entries of 128 bytes (name[64], le64 first sector, le64 length in bytes,
# sha256[32], 16 reserved), the files' data after it, each file from a sector boundary; the superblock also
# names a scratch area (le64 first sector at +24, le64 sectors at +32) that no file uses.
# Command 1, backup (the agent): reads the superblock and directory (9 sectors) and sends them over the
# console's transmitq, then every file's bytes, file after file in directory order, in pieces of at most
# 64 KiB: each piece read from the disk into RAM by DMA, then handed to the console as one descriptor. The
# host's end of the console (labkit.backup.agent) writes the stream to a file and checks it. The guest
# never looks at the data: the two devices do the copying (the whole point of a paravirtual channel).
# Command 2, work: `count` writes of one sector each into the scratch area, round and round: write i goes to
# scratch first + i % sectors and holds le64 "LKSCRTCH", le64 i, le64 i * 0x9E3779B97F4A7C15, zeros after.
# After each write is answered the guest stores i + 1 at 0x80010 (acknowledged writes), then a flush.
# Parameters (written by the host before the run): 0x80000 u32 magic "BKAG" (0x47414B42), 0x80004 u32
# command (1 backup, 2 work), 0x80008 u32 count (work), 0x80010 u32 acknowledged writes (the guest's answer).
# Without a parameter block: a backup. Devices: virtio-blk at 0x3FFFE000 (notify port 0xF8, queue 0 with 16
# entries), virtio console at 0x3FFFF000 (notify port 0xF6, transmitq 1 with 16 entries); one request in
# flight on each, the guest polls used.idx; the workload needs no console. Exit code (debug-exit port): 0 done, 1 bad parameters, 2 no
# usable virtio-blk or console, 3 a device set DEVICE_NEEDS_RESET, 4 a disk request failed, 6 the disk's
# superblock or directory is not LKFS version 1 or names sectors past the disk. Ring 0, long mode.

        .equ BLK, 0x3FFFE000            # labkit.x86.layout.VIRTIO_BLK_MMIO_BASE
        .equ CON, 0x3FFFF000            # layout.VIRTIO_MMIO_BASE
        .equ BLK_NOTIFY, 0xF8
        .equ CON_NOTIFY, 0xF6
        .equ DEBUG_EXIT, 0xF4
        .equ COM1, 0x3F8
        .equ PARAMS, 0x80000
        .equ MAGIC, 0x47414B42
        .equ ACKED, 0x80010
        .equ DESC, 0x81000              # the block device's queue
        .equ AVAIL, 0x82000
        .equ USED, 0x83000
        .equ HDR, 0x84000
        .equ STATUS_BYTE, 0x84010
        .equ CDESC, 0x85000             # the console's transmit queue
        .equ CAVAIL, 0x86000
        .equ CUSED, 0x87000
        .equ META, 0x90000              # superblock + directory: 9 sectors
        .equ META_SECTORS, 9
        .equ BUFFER, 0x100000
        .equ PIECE_SECTORS, 128         # 64 KiB per request
        .equ QSIZE, 16
        .equ TRANSMITQ, 1
        .equ FS_MAGIC, 0x53464B4C       # "LKFS"
        .equ ENTRIES, 32
        .equ ENTRY, 128
        .equ MIX, 0x9E3779B97F4A7C15
        .equ T_IN, 0
        .equ T_OUT, 1
        .equ T_FLUSH, 4
        .include "virtio_mmio.inc"         # the transport's registers and status bits

start:
        mov dword ptr [command], 1
        cmp dword ptr [PARAMS], MAGIC
        jne 1f
        mov eax, [PARAMS + 4]
        mov [command], eax
        mov eax, [PARAMS + 8]
        mov [count], eax
        mov dword ptr [ACKED], 0
        mov eax, [command]
        cmp eax, 1
        je 1f
        cmp eax, 2
        jne bad_params
        cmp dword ptr [count], 0
        je bad_params
1:
        mov ebp, BLK                                    # the block device, queue 0
        mov ebx, 2
        xor r12d, r12d
        mov r13d, DESC
        call init_device
        mov eax, [rbp + R_CAPACITY_HIGH]
        shl rax, 32
        mov ecx, [rbp + R_CAPACITY_LOW]
        or rax, rcx
        mov [capacity], rax
        cmp rax, META_SECTORS
        jb bad_fs
        xor r14d, r14d                                  # the block queue's avail.idx

        mov eax, T_IN                                   # superblock and directory
        xor edx, edx
        mov ecx, META_SECTORS
        mov edi, META
        mov r8d, 2
        call request
        cmp dword ptr [META], FS_MAGIC
        jne bad_fs
        cmp dword ptr [META + 4], 1
        jne bad_fs
        mov eax, [META + 8]
        cmp eax, ENTRIES
        ja bad_fs
        mov [files], eax
        cmp dword ptr [command], 2
        je work

        # -- command 1: the metadata, then each file, over the console --
        mov ebp, CON                                    # the console, transmitq
        mov ebx, 3
        mov r12d, TRANSMITQ
        mov r13d, CDESC
        call init_device
        xor r15d, r15d                                  # the console's avail.idx
        mov esi, META
        mov ecx, META_SECTORS * 512
        call send
        xor r12d, r12d                                  # file number
next_file:
        cmp r12d, [files]
        jae backup_done
        mov eax, r12d
        shl eax, 7
        lea rsi, [META + 512 + rax]
        mov rbx, [rsi + 64]                             # first sector
        mov r13, [rsi + 72]                             # bytes left
        lea rax, [r13 + 511]                            # the file's sectors must be on the disk
        shr rax, 9
        add rax, rbx
        jc bad_fs
        cmp rax, [capacity]
        ja bad_fs
next_piece:
        test r13, r13
        jz file_done
        mov ecx, PIECE_SECTORS                          # sectors = min(128, ceil(left / 512))
        lea rax, [r13 + 511]
        shr rax, 9
        cmp rax, rcx
        cmovb rcx, rax
        push rcx
        mov eax, T_IN
        mov rdx, rbx
        mov edi, BUFFER
        mov r8d, 2
        call request
        pop rcx
        add rbx, rcx
        shl rcx, 9                                      # bytes = min(sectors * 512, left)
        cmp rcx, r13
        cmova rcx, r13
        sub r13, rcx
        mov esi, BUFFER
        call send
        jmp next_piece
file_done:
        inc r12d
        jmp next_file
backup_done:
        lea rsi, [msg_backup]
        call puts
        jmp backup_finish

        # -- command 2: count one-sector writes round the scratch area --
work:
        mov rax, [META + 32]                            # scratch sectors: at least one, on the disk
        test rax, rax
        jz bad_fs
        add rax, [META + 24]
        jc bad_fs
        cmp rax, [capacity]
        ja bad_fs
        mov edi, BUFFER
        mov ecx, 64
        xor eax, eax
        rep stosq
        xor r12d, r12d                                  # write number i
next_write:
        mov rax, 0x4843545243534B4C                     # "LKSCRTCH"
        mov [BUFFER], rax
        mov [BUFFER + 8], r12
        mov rax, r12
        mov rcx, MIX
        imul rax, rcx
        mov [BUFFER + 16], rax
        mov rax, r12
        xor edx, edx
        div qword ptr [META + 32]
        add rdx, [META + 24]                            # sector = first + i % sectors
        mov eax, T_OUT
        mov ecx, 1
        mov edi, BUFFER
        xor r8d, r8d
        call request
        inc r12d
        mov [ACKED], r12d                               # acknowledged: the host may count it
        cmp r12d, [count]
        jb next_write
        mov eax, T_FLUSH
        xor edx, edx
        xor ecx, ecx
        call request
        lea rsi, [msg_work]
        call puts
        jmp finish
backup_finish:
        mov ebp, CON
        test dword ptr [rbp + R_STATUS], NEEDS_RESET
        jnz needs_reset
finish:
        mov ebp, BLK
        test dword ptr [rbp + R_STATUS], NEEDS_RESET
        jnz needs_reset
        xor eax, eax
        out DEBUG_EXIT, al
        hlt

        .include "virtio_init.inc"         # init_device: rbp device, ebx its ID, r12 queue, r13 its memory

# One block request of type eax at sector rdx with ecx sectors of data at rdi (r8: 0 device-readable,
# 2 device-writable; ecx 0: no data). Waits for the answer; a status other than OK ends the run (exit 4).
request:
        mov [HDR], eax                                  # header: type, reserved, sector
        mov dword ptr [HDR + 4], 0
        mov [HDR + 8], rdx
        mov byte ptr [STATUS_BYTE], 0xFF
        mov qword ptr [DESC], HDR                       # desc[0]: the header, device-readable
        mov dword ptr [DESC + 8], 16
        mov word ptr [DESC + 12], 1                     # NEXT
        mov word ptr [DESC + 14], 2                     # no data: next is the status
        test ecx, ecx
        jz 1f
        mov word ptr [DESC + 14], 1                     # next is the data
        mov [DESC + 16], rdi                            # desc[1]: the data
        shl ecx, 9
        mov [DESC + 16 + 8], ecx
        or r8d, 1                                       # NEXT
        mov [DESC + 16 + 12], r8w
        mov word ptr [DESC + 16 + 14], 2
1:
        mov qword ptr [DESC + 32], STATUS_BYTE          # desc[2]: the status, device-writable, last
        mov dword ptr [DESC + 32 + 8], 1
        mov dword ptr [DESC + 32 + 12], 2               # WRITE, next 0
        mov eax, r14d
        and eax, QSIZE - 1
        mov word ptr [AVAIL + 4 + rax * 2], 0           # avail.ring[idx % size] = descriptor 0
        inc r14d
        mov [AVAIL + 2], r14w                           # avail.idx: visible (x86 keeps stores in order)
        mov dx, BLK_NOTIFY
        xor eax, eax
        out dx, ax                                      # notify queue 0
        mov esi, AVAIL
        mov ebp, BLK
        mov eax, r14d
        call wait_used
        cmp byte ptr [STATUS_BYTE], 0
        jne request_failed
        ret

# Hand ecx bytes at rsi to the console's transmitq as one descriptor and wait until it is used.
send:
        mov [CDESC], rsi
        mov [CDESC + 8], ecx
        mov dword ptr [CDESC + 12], 0                   # device-readable, last of its chain
        mov eax, r15d
        and eax, QSIZE - 1
        mov word ptr [CAVAIL + 4 + rax * 2], 0
        inc r15d
        mov [CAVAIL + 2], r15w
        mov dx, CON_NOTIFY
        mov ax, TRANSMITQ
        out dx, ax
        mov esi, CAVAIL
        mov ebp, CON
        mov eax, r15d
        call wait_used
        ret

# Wait until the used ring after the available ring at rsi (+0x1000) reaches ax; device at rbp.
wait_used:
        mov ecx, 4096
1:
        cmp [rsi + 0x1000 + 2], ax
        je 2f
        pause
        dec ecx
        jnz 1b
        test dword ptr [rbp + R_STATUS], NEEDS_RESET    # not answered yet: a broken device?
        jnz needs_reset
        mov ecx, 4096
        jmp 1b
2:
        ret

# The UART: a NUL-terminated string at rsi.
puts:
        lodsb
        test al, al
        jz 2f
        mov ah, al
        mov dx, COM1 + 5
1:
        in al, dx
        test al, 0x20                                   # THR empty
        jz 1b
        mov al, ah
        mov dx, COM1
        out dx, al
        jmp puts
2:
        ret

        .include "virtio_exits.inc"        # bad_params 1, no_device 2, needs_reset 3: exit codes
request_failed:
        mov eax, 4
        out DEBUG_EXIT, al
        hlt
bad_fs:
        mov eax, 6
        out DEBUG_EXIT, al
        hlt

        .align 8
capacity:
        .quad 0
command:
        .long 0
count:
        .long 0
files:
        .long 0
msg_backup:
        .asciz "backup64: files sent\n"
msg_work:
        .asciz "backup64: writes done\n"
