/*
 * The common case of DeviceQueue.drain (labkit/virtio/ring.py) in C: a transmit queue whose chains
 * are one device-readable buffer each, consumed into a labkit Console's storage.
 *
 * Built and loaded by labkit/virtio/native.py (no Python headers: every address is handed over).
 * It takes a chain only if the Python fast path would take it the same way: the available slot
 * names a descriptor below the queue size, the descriptor's flags are 0 (no NEXT, WRITE or
 * INDIRECT), its length is not 0, and [addr, addr + len) lies inside the region that holds the
 * descriptor table (the queue's MemoryWindow).  For anything else (more chains waiting than the
 * queue size, a chain of several descriptors, an indirect table, a buffer in another region, any
 * error) it stops before that chain and says so, and ring.py goes on in Python from there, where
 * every check and every error message lives.  So both give the same ring, console and errors.
 *
 * Per chain, as in ring.py: the buffer's bytes appended to the console (up to its capacity; the
 * rest is counted as dropped by the caller), the used element {id: head, len: 0} written (2.7.8),
 * and after the last chain the used idx stored once (2.7.13.3: elements before idx).
 *
 * The console's storage is an anonymous mapping whose pages the kernel allocates on first write.
 * Before the bytes of a chain would cross into pages not yet allocated, the next 64 KiB are
 * allocated in one madvise(MADV_POPULATE_WRITE) (Linux 5.14): one system call for 16 pages is
 * about half the cost of 16 page faults on the development machine.  Where the kernel refuses it
 * (older kernels: EINVAL) the copy faults the pages in as before.
 */
#define _DEFAULT_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

enum { POPULATE_CHUNK = 64 * 1024, PAGE = 4096 };

/* Mirrored by TransmitQueue in labkit/virtio/native.py (a test compares the layouts). */
struct transmit_queue {
    const uint8_t *desc;        /* descriptor table (2.7.5), 16 bytes per entry */
    const uint8_t *avail;       /* available ring (2.7.6) */
    uint8_t *used;              /* used ring (2.7.8) */
    const uint8_t *window;      /* host address of the region holding the descriptor table */
    uint64_t window_base;       /* its guest-physical address */
    uint64_t window_size;       /* and size */
    uint32_t size;              /* queue size, a power of 2 */
    uint32_t stopped;           /* out: 1 if a chain was left for Python */
    uint32_t last_avail;        /* in/out: the device's avail idx (free-running, 16 bits) */
    uint32_t used_idx;          /* in/out: the used idx to publish next */
    uint8_t *sink;              /* the console's storage */
    uint64_t sink_length;       /* in/out: bytes it holds */
    uint64_t sink_capacity;     /* bytes it may hold */
    uint64_t sink_ready;        /* bytes from its start known to be allocated (populated) */
    uint64_t moved;             /* out: bytes of the chains consumed (kept or dropped) */
};

static uint16_t load16(const uint8_t *p)
{
    uint16_t value;
    memcpy(&value, p, sizeof value);
    return value;
}

/* Allocate the console's pages up to `end` (rounded up to the next chunk) before the copy writes them. */
static void populate(struct transmit_queue *q, uint64_t end)
{
    uint64_t from = (q->sink_ready > q->sink_length ? q->sink_ready : q->sink_length) & ~(uint64_t)(PAGE - 1);
    uint64_t to = (end + POPULATE_CHUNK - 1) & ~(uint64_t)(POPULATE_CHUNK - 1);
    if (to > q->sink_capacity)
        to = q->sink_capacity;
    if (to > from)
        madvise(q->sink + from, to - from, MADV_POPULATE_WRITE);
    q->sink_ready = to;
}

/* Consume the waiting chains it can take; returns how many.  `stopped` says whether one was left. */
uint64_t transmit_drain(struct transmit_queue *q)
{
    uint32_t last = q->last_avail, used_idx = q->used_idx, mask = q->size - 1;
    uint32_t waiting = (uint16_t)(load16(q->avail + 2) - last);
    uint64_t chains = 0, moved = 0;
    q->stopped = waiting > q->size;  /* an error: ring.py says which */
    for (uint32_t i = 0; i < waiting && !q->stopped; i++) {
        uint16_t head = load16(q->avail + 4 + 2 * (last & mask));
        if (head >= q->size) {
            q->stopped = 1;
            break;
        }
        const uint8_t *entry = q->desc + 16 * (uint64_t)head;
        uint64_t addr;
        uint32_t len;
        memcpy(&addr, entry, sizeof addr);
        memcpy(&len, entry + 8, sizeof len);
        uint16_t flags = load16(entry + 12);
        uint64_t offset = addr - q->window_base;  /* wraps to a huge value below the region */
        if (flags != 0 || len == 0 || addr < q->window_base || offset > q->window_size
            || len > q->window_size - offset) {
            q->stopped = 1;
            break;
        }
        uint64_t room = q->sink_capacity - q->sink_length;
        uint64_t kept = len < room ? len : room;
        if (kept) {
            if (q->sink_length + kept > q->sink_ready)
                populate(q, q->sink_length + kept);
            memcpy(q->sink + q->sink_length, q->window + offset, kept);
            q->sink_length += kept;
        }
        uint32_t element[2] = {head, 0};
        memcpy(q->used + 4 + 8 * (used_idx & mask), element, sizeof element);
        used_idx = (used_idx + 1) & 0xFFFF;
        last = (last + 1) & 0xFFFF;
        chains++;
        moved += len;
    }
    if (chains)
        __atomic_store_n((uint16_t *)(q->used + 2), (uint16_t)used_idx, __ATOMIC_RELEASE);
    q->last_avail = last;
    q->used_idx = used_idx;
    q->moved = moved;
    return chains;
}

/* sizeof struct transmit_queue and offsetof moved, for the test that compares them with the ctypes mirror. */
void transmit_queue_layout(uint64_t out[2])
{
    out[0] = sizeof(struct transmit_queue);
    out[1] = offsetof(struct transmit_queue, moved);
}
