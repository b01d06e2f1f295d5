/*
 * The cheapest UC_HOOK_INTR callback there is, for bench_emu.py's trap floor:
 * reset old_exception (unicorn#1883) and move RIP past the faulting
 * instruction, in place.  Unicorn's fault path plus this hook is what any
 * delivery written in C starts from.
 */

#include <stdint.h>
#include <string.h>

struct fault_floor {
    uint8_t *cpu;              /* Unicorn's CPUX86State */
    uint32_t old_exception;    /* offsets in it */
    uint32_t eip;
    uint64_t skip;             /* bytes to move RIP on */
};

void fault_floor_hook(void *uc, uint32_t vector, void *user_data)
{
    struct fault_floor *f = user_data;
    int32_t none = -1;
    uint64_t eip;
    (void)uc;
    (void)vector;
    memcpy(f->cpu + f->old_exception, &none, 4);
    memcpy(&eip, f->cpu + f->eip, 8);
    eip += f->skip;
    memcpy(f->cpu + f->eip, &eip, 8);
}
