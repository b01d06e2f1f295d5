/*
 * Trap replay: labkit's UC_HOOK_INTR callback, in C.
 *
 * labkit/emu/delivery.py delivers every exception through the guest's IDT in
 * Python and, after a long-mode delivery, records what it read and did as a
 * plan.  This file replays such a plan without entering Python: it checks that
 * everything the plan was made from is unchanged (LDTR, TR, GDTR, IDTR and
 * CR0..CR4 except CR2; the IDT gate; the code descriptor; the stack page), then
 * pushes the frame into guest RAM and loads RSP, CS (and SS), hflags, RIP and
 * RFLAGS in place.  Anything else -- no plan, a changed table, a frame on
 * another page, a stop in progress -- goes to the Python hook, which is also
 * the reference implementation: tests run the same guests both ways.
 *
 * No Unicorn or Python headers: the layout of Unicorn's CPUX86State comes as
 * offsets from labkit/emu/internals.py (each probed at start-up), and uc_reg_read is a
 * function pointer.  struct trap_replay is mirrored by a ctypes Structure in
 * labkit/emu/native.py; trap_replay_layout() lets a test compare the two.
 *
 * The same library holds the stop gate (stop_gate_hook, below): the
 * UC_HOOK_BLOCK callback through which stops from outside the guest are taken.
 *
 * Built by labkit/emu/native.py with the system C compiler (cc -O2 -shared).
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PLAN_SLOTS 64        /* direct-mapped: a plan evicts the one in its slot */
#define SYSTEM_BYTES 136     /* LDTR, TR, GDTR, IDTR (4 x 24 bytes) and CR0..CR4 */
#define CACHE_BYTES 48       /* the CS segment cache, or CS and SS (adjacent in segs[]) */
#define NO_STACK_SWITCH UINT64_MAX
#define RF 0x10000ull        /* RFLAGS.RF */
/* Fault-class vectors (labkit/emu/delivery.py's FAULT_VECTORS): #DE, #BR, #UD, #NM, #TS, #NP, #SS, #GP,
 * #PF, #MF, #AC, #XM, #VE, #CP.  The CPU pushes RF = 1 for these (SDM vol. 3, 18.3.1.1; #DB never
 * comes here as a fault: labkit sets no instruction breakpoints). */
#define FAULT_VECTORS 0x3B7CE1u

typedef void (*hook_intr)(void *uc, uint32_t vector, void *user_data);
typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef int (*vmem_read_fn)(void *uc, uint64_t address, uint32_t prot, void *bytes, size_t size);

struct plan {
    uint64_t key;            /* hflags << 9 | software << 8 | vector; 0: empty slot */
    uint64_t gate_at;        /* guest-physical address of the 16-byte IDT gate */
    uint64_t gate[2];
    uint64_t descriptor_at;  /* guest-physical address of the code segment descriptor */
    uint64_t descriptor;
    uint64_t stack_at;       /* guest-physical address of RSP0..2/IST in the TSS, or NO_STACK_SWITCH */
    uint64_t stack_page;     /* the linear page the frame went to (address >> 12) ... */
    uint64_t stack_frame;    /* ... and the guest-physical page behind it, RAM-backed, writable */
    uint64_t target;         /* the handler's RIP */
    uint64_t keep_mask;      /* RFLAGS bits the delivery keeps (clears TF, NT, RF, VM and IF for interrupt gates) */
    uint32_t frame_size;     /* 40, or 48 with an error code */
    uint32_t hflags_after;
    uint32_t caches_size;    /* 24 (CS) or 48 (CS and SS) */
    uint32_t error;          /* push the error code */
    uint8_t caches[CACHE_BYTES];
    uint8_t system[SYSTEM_BYTES];
};

struct trap_replay {
    uint8_t *cpu;            /* Unicorn's CPUX86State */
    uint8_t *ram;            /* guest RAM at guest-physical 0 */
    uint64_t ram_size;
    reg_read_fn reg_read;    /* uc_reg_read */
    hook_intr slow;          /* the Python hook: everything the replay does not do */
    int32_t rflags_reg;      /* UC_X86_REG_RFLAGS */
    int32_t stopping;        /* a stop is in progress: leave the exception to Python */
    /* Offsets in CPUX86State (internals.py). */
    uint32_t eip, eflags, hflags, rsp, cs, ss, system, cr2_in_system;
    uint32_t old_exception, error_code, exception_is_int, unused;
    uint64_t replayed;       /* exceptions delivered here */
    uint64_t passed_on;      /* exceptions handed to the slow hook */
    struct plan plans[PLAN_SLOTS];
    uint8_t *dirty_bitmap;   /* while the dirty log is on: its bitmap (the frame's page is logged), else NULL */
    uint64_t dirty_pages;
    /* For a #PF's W/R bit (page_fault_write_bit): uc_vmem_read, CS.base's offset, HF_CS64_MASK. */
    vmem_read_fn vmem_read;
    uint32_t cs_base, cs64_mask;
};

static inline uint64_t load64(const uint8_t *at)
{
    uint64_t value;
    memcpy(&value, at, 8);
    return value;
}

static inline uint32_t load32(const uint8_t *at)
{
    uint32_t value;
    memcpy(&value, at, 4);
    return value;
}

static inline void store64(uint8_t *at, uint64_t value) { memcpy(at, &value, 8); }
static inline void store32(uint8_t *at, uint32_t value) { memcpy(at, &value, 4); }

unsigned trap_replay_slot(uint64_t key)
{
    return (unsigned)((key * 0x9E3779B97F4A7C15ull) >> 58);  /* Fibonacci hashing into 64 slots */
}

/* Deliver `vector` from its plan; 0 (and nothing changed) when the plan does not apply. */
static int replay(struct trap_replay *t, void *uc, uint32_t vector)
{
    uint8_t *cpu = t->cpu;
    uint32_t hflags = load32(cpu + t->hflags);
    uint64_t software = load32(cpu + t->exception_is_int) != 0;
    uint64_t key = (uint64_t)hflags << 9 | software << 8 | vector;
    const struct plan *p = &t->plans[trap_replay_slot(key)];
    const uint8_t *system = cpu + t->system;
    uint32_t cr2 = t->cr2_in_system;

    if (p->key != key
        || load64(t->ram + p->gate_at) != p->gate[0] || load64(t->ram + p->gate_at + 8) != p->gate[1]
        || load64(t->ram + p->descriptor_at) != p->descriptor
        || memcmp(system, p->system, cr2) != 0
        || memcmp(system + cr2 + 8, p->system + cr2 + 8, SYSTEM_BYTES - cr2 - 8) != 0)
        return 0;

    uint64_t old_rsp = load64(cpu + t->rsp);
    uint64_t base = p->stack_at == NO_STACK_SWITCH ? old_rsp : load64(t->ram + p->stack_at);
    uint64_t rsp = (base & ~(uint64_t)0xF) - p->frame_size;
    if (rsp >> 12 != p->stack_page || (rsp & 0xFFF) + p->frame_size > 0x1000)
        return 0;
    uint64_t rflags = 0;  /* EFLAGS (outside 64-bit mode) fills only the low half */
    if (t->reg_read(uc, t->rflags_reg, &rflags) != 0)
        return 0;
    if (!software && vector < 32 && (FAULT_VECTORS >> vector & 1))
        rflags |= RF;  /* pushed only: keep_mask clears RF in RFLAGS */

    uint8_t *frame = t->ram + (p->stack_frame << 12 | (rsp & 0xFFF));
    if (p->error) {
        store64(frame, load32(cpu + t->error_code));
        frame += 8;
    }
    store64(frame, load64(cpu + t->eip));
    store64(frame + 8, load32(cpu + t->cs));
    store64(frame + 16, rflags);
    store64(frame + 24, old_rsp);
    store64(frame + 32, load32(cpu + t->ss));
    if (t->dirty_bitmap != NULL && p->stack_frame < t->dirty_pages)  /* the CPU pushed it: KVM logs it too */
        t->dirty_bitmap[p->stack_frame >> 3] |= (uint8_t)(1u << (p->stack_frame & 7));

    store64(cpu + t->rsp, rsp);
    memcpy(cpu + t->cs, p->caches, p->caches_size);
    store32(cpu + t->hflags, p->hflags_after);
    store64(cpu + t->eip, p->target);
    store64(cpu + t->eflags, load64(cpu + t->eflags) & p->keep_mask);
    return 1;
}

/*
 * Whether the instruction at `code` reads and writes its ModRM memory operand: the read-modify-write
 * instructions of the SDM's opcode map (vol. 2, appendix A).  The same tables as reads_and_writes_memory
 * in labkit/emu/delivery.py: per opcode, a mask of the ModRM reg fields that are read-modify-write.
 */
static int reads_and_writes_memory(const uint8_t *code, size_t n, int long_mode)
{
    static uint8_t one[256], two[256];
    static int ready;
    if (!ready) {
        for (int base = 0x00; base <= 0x30; base += 8)
            one[base] = one[base + 1] = 0xFF;           /* ADD OR ADC SBB AND SUB XOR r/m, r (not CMP) */
        one[0x86] = one[0x87] = 0xFF;                   /* XCHG */
        one[0x80] = one[0x81] = one[0x82] = one[0x83] = 0x7F;  /* group 1 but CMP (/7) */
        one[0xC0] = one[0xC1] = one[0xD0] = one[0xD1] = one[0xD2] = one[0xD3] = 0xFF;  /* shifts, rotates */
        one[0xF6] = one[0xF7] = 0x0C;                   /* NOT, NEG */
        one[0xFE] = one[0xFF] = 0x03;                   /* INC, DEC */
        two[0xA4] = two[0xA5] = two[0xAC] = two[0xAD] = 0xFF;  /* SHLD, SHRD */
        two[0xAB] = two[0xB3] = two[0xBB] = 0xFF;       /* BTS, BTR, BTC */
        two[0xBA] = 0xE0;                               /* group 8: BTS, BTR, BTC (not BT) */
        two[0xB0] = two[0xB1] = two[0xC0] = two[0xC1] = 0xFF;  /* CMPXCHG, XADD */
        two[0xC7] = 0x02;                               /* CMPXCHG8B/16B */
        ready = 1;
    }
    size_t at = 0;
    while (at < n) {
        uint8_t byte = code[at];
        if (byte == 0x26 || byte == 0x2E || byte == 0x36 || byte == 0x3E || byte == 0x64 || byte == 0x65
            || byte == 0x66 || byte == 0x67 || byte == 0xF0 || byte == 0xF2 || byte == 0xF3
            || (long_mode && byte >= 0x40 && byte <= 0x4F))
            at++;
        else
            break;
    }
    const uint8_t *table = one;
    if (at < n && code[at] == 0x0F) {
        table = two;
        at++;
    }
    if (at + 1 >= n)
        return 0;
    uint8_t fields = table[code[at]], modrm = code[at + 1];
    return modrm >> 6 != 3 && (fields >> ((modrm >> 3) & 7) & 1);
}

/*
 * QEMU raises a read-modify-write instruction's #PF from its load, with W/R = 0; the CPU (and KVM)
 * report a write.  Set W/R in the error code when the instruction at RIP is one (not for a fetch fault:
 * CR2 inside the instruction; nor where its bytes cannot be read).  delivery.page_fault_error_code is
 * the same in Python.
 */
static void page_fault_write_bit(struct trap_replay *t, void *uc)
{
    uint8_t *cpu = t->cpu;
    uint32_t error = load32(cpu + t->error_code);
    if (error & 2 || t->vmem_read == NULL)
        return;
    int long_mode = (load32(cpu + t->hflags) & t->cs64_mask) != 0;
    uint64_t linear = load64(cpu + t->cs_base) + load64(cpu + t->eip);
    if (!long_mode)
        linear &= 0xFFFFFFFFull;
    if (load64(cpu + t->system + t->cr2_in_system) - linear < 15)
        return;
    uint8_t code[15];
    size_t first = 0x1000 - (linear & 0xFFF), n;
    if (first > 15)
        first = 15;
    if (t->vmem_read(uc, linear, 4 /* UC_PROT_EXEC */, code, first) != 0)
        return;
    n = first;
    if (first < 15 && t->vmem_read(uc, linear + first, 4, code + first, 15 - first) == 0)
        n = 15;
    if (reads_and_writes_memory(code, n, long_mode))
        store32(cpu + t->error_code, error | 2);
}

/* The UC_HOOK_INTR callback; user_data is the struct trap_replay. */
void trap_replay_hook(void *uc, uint32_t vector, void *user_data)
{
    struct trap_replay *t = user_data;
    store32(t->cpu + t->old_exception, (uint32_t)-1);  /* unicorn#1883 */
    if (vector == 14 && !t->stopping && load32(t->cpu + t->exception_is_int) == 0)
        page_fault_write_bit(t, uc);
    /* vector > 255: EXCP_VMEXIT + exit code, labkit's CR/MSR intercepts (labkit/emu/intercepts.py) */
    if (!t->stopping && vector < 256 && replay(t, uc, vector)) {
        t->replayed++;
        return;
    }
    t->passed_on++;
    t->slow(uc, vector, user_data);
}

/*
 * Stop gate.  Unicorn 2.1.4 honours a uc_emu_stop (QEMU's cpu_exit: icount_decr
 * goes negative) at the start of each translated block and also after every
 * guest load and store (check_exit_request, qemu/tcg/tcg-op.c), where
 * cpu_loop_exit_restore puts RIP back to the start of the instruction even when
 * its store has landed: a stop from another thread could run `inc [m]` twice.
 * So other threads never call uc_emu_stop; they set `requested`, and this hook,
 * which Unicorn calls before a block's own exit check (qemu/accel/tcg/translator.c:
 * the block hook is generated before gen_tb_start), calls uc_emu_stop there: the
 * stop is taken at that block boundary, an instruction boundary, every time.
 * `requested` stays set until the run loop clears it, so a request that lands
 * before uc_emu_start (which clears Unicorn's own stop_request) is not lost.
 */
typedef int (*emu_stop_fn)(void *uc);
typedef int (*vmem_read_fn)(void *uc, uint64_t address, uint32_t prot, void *bytes, size_t size);

struct stop_gate {
    int32_t requested;       /* a kick, pause or deadline: stop at the next block boundary (any thread) */
    int32_t held;            /* the run loop runs one instruction alone: let it finish */
    emu_stop_fn emu_stop;    /* uc_emu_stop */
    uint64_t stops;          /* stops taken here */
    uint64_t blocks;         /* blocks entered: with RIP, names one execution of an instruction */
    /* For out_next_rip: Unicorn's CPUX86State, uc_vmem_read, offsets (internals.py) and HF_CS64_MASK. */
    uint8_t *cpu;
    vmem_read_fn vmem_read;
    uint32_t eip, cs_base, hflags, cs64_mask;
};

/* The UC_HOOK_BLOCK callback; user_data is the struct stop_gate. */
void stop_gate_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct stop_gate *g = user_data;
    (void)address;
    (void)size;
    g->blocks++;
    if (__atomic_load_n(&g->requested, __ATOMIC_ACQUIRE) && !g->held) {
        g->stops++;
        g->emu_stop(uc);
    }
}

/* Length of the IN/OUT at `code` (prefixes, then E4-E7 ib or EC-EF); -1 for anything else or too few bytes. */
static int io_length(const uint8_t *code, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t byte = code[i];
        if (byte == 0x66 || byte == 0x67 || byte == 0xF2 || byte == 0xF3 || byte == 0x2E || byte == 0x36
            || byte == 0x3E || byte == 0x26 || byte == 0x64 || byte == 0x65 || byte == 0xF0
            || (byte >= 0x40 && byte <= 0x4F))
            continue;
        if (byte >= 0xE4 && byte <= 0xE7)
            return (int)i + 2;
        if (byte >= 0xEC && byte <= 0xEF)
            return (int)i + 1;
        return -1;
    }
    return -1;
}

/*
 * In an OUT hook (Unicorn has put RIP at the OUT): RIP after it, as KVM reports it; RIP itself for
 * string OUTS or where the code cannot be read.  The same as _io_instruction_length in
 * labkit/emu/unicorn_backend.py, read through the guest's page tables with uc_vmem_read (one page at a time).
 */
uint64_t out_next_rip(struct stop_gate *g, void *uc)
{
    uint64_t rip = load64(g->cpu + g->eip);
    uint64_t linear = load64(g->cpu + g->cs_base) + rip;
    uint8_t code[15];
    if (!(load32(g->cpu + g->hflags) & g->cs64_mask))
        linear &= 0xFFFFFFFFull;
    size_t first = 0x1000 - (linear & 0xFFF);
    if (first > 15)
        first = 15;
    if (g->vmem_read(uc, linear, 4 /* UC_PROT_EXEC */, code, first) != 0)
        return rip;
    int length = io_length(code, first);
    if (length < 0 && first < 15 && g->vmem_read(uc, linear + first, 4, code + first, 15 - first) == 0)
        length = io_length(code, 15);
    return length < 0 ? rip : rip + (uint64_t)length;
}

/* sizeof struct stop_gate and offsetof stops, for the test that compares them with the ctypes mirror. */
void stop_gate_layout(uint64_t out[2])
{
    out[0] = sizeof(struct stop_gate);
    out[1] = offsetof(struct stop_gate, stops);
}

/*
 * The UC_HOOK_MEM_READ / UC_HOOK_MEM_WRITE callback over the MMIO range: does
 * nothing.  Unicorn puts RIP back to the accessing instruction
 * (cpu_restore_state, qemu/accel/tcg/cputlb.c) before it calls a memory hook
 * bound to the address, which it does not do for an MMIO callback alone; so
 * with this hook installed, the MMIO callback sees the instruction's RIP, not
 * the start of its translated block.
 */
void sync_pc_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    (void)uc;
    (void)type;
    (void)address;
    (void)size;
    (void)value;
    (void)user_data;
}

/*
 * The dirty log: a UC_HOOK_MEM_WRITE callback that sets the bit of the guest-physical page
 * each guest store lands in (both pages for a store that crosses a page boundary).  Unicorn
 * hands the hook the linear address; uc_vmem_translate walks the guest's page tables (or
 * passes the address through where paging is off).  Pages past `pages` (MMIO above every
 * region) are not logged.  struct dirty_log is mirrored in labkit/emu/unicorn_backend.py.
 */
typedef int (*vmem_translate_fn)(void *uc, uint64_t address, uint32_t prot, uint64_t *paddress);

struct dirty_log {
    uint8_t *bitmap;
    uint64_t pages;
    vmem_translate_fn translate;
    uint64_t untranslated;   /* stores whose address did not translate (the store then faults) */
    int32_t frozen;          /* RAM is write-protected for an exact stop: the store will not land */
    int32_t unused;
};

static void dirty_mark(struct dirty_log *d, void *uc, uint64_t linear)
{
    uint64_t physical;
    if (d->translate(uc, linear, 2 /* UC_PROT_WRITE */, &physical) != 0) {
        d->untranslated++;
        return;
    }
    uint64_t page = physical >> 12;
    if (page < d->pages)
        d->bitmap[page >> 3] |= (uint8_t)(1u << (page & 7));
}

void dirty_write_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct dirty_log *d = user_data;
    (void)type;
    (void)value;
    if (d->frozen)
        return;
    dirty_mark(d, uc, address);
    if (size > 1 && ((address ^ (address + (uint64_t)size - 1)) >> 12) != 0)
        dirty_mark(d, uc, address + (uint64_t)size - 1);
}

/* Sizes and offsets, for the test that compares them with the ctypes mirror. */
void trap_replay_layout(uint64_t out[6])
{
    out[0] = sizeof(struct trap_replay);
    out[1] = sizeof(struct plan);
    out[2] = offsetof(struct trap_replay, replayed);
    out[3] = offsetof(struct trap_replay, plans);
    out[4] = offsetof(struct plan, caches);
    out[5] = offsetof(struct plan, system);
}
