/*
 * Baseline for benchmarks/bench_fleet.py: create a KVM VM, run hello64 on it,
 * destroy it, N times, with the smallest possible C VMM on the raw KVM API.
 *
 * Per cycle, what labkit's Machine("hello64", backend="kvm").run() + close()
 * must also do: KVM_CREATE_VM, 2 MiB of guest RAM (mmap + memory slot), one
 * vCPU and its kvm_run mapping, 64-bit long mode (identity page tables for
 * 1 GiB with 2 MiB pages at 0x1000-0x3fff, CR0.PG|PE, CR4.PAE, EFER.LME|LMA,
 * flat 64-bit code and data segments set through KVM_SET_SREGS), the guest
 * binary copied to 0x8000, then KVM_RUN until HLT while answering the UART:
 * an `in` of LSR (0x3fd) reads THRE set, an `out` to THR (0x3f8) appends the
 * byte to the console.  Then everything is closed and unmapped.
 * /dev/kvm is opened once (labkit keeps it open too).
 *
 * Usage: kvm_vm_cycle hello64.bin N  ->  prints {"cycles": N, "seconds": t, "cpu_seconds": c,
 *        "life_cpu_us": [...], "life_wall_us": [...], "console": "..."}
 *        kvm_vm_cycle hello64.bin -  ->  the same line for each count read from stdin, one count a line,
 *        until an empty line or EOF (so a caller can interleave its own lives with these, a few at a time)
 * (cpu_seconds: this thread's CPU time, user + kernel, the fair measure on a loaded machine;
 * life_cpu_us and life_wall_us: each cycle's own, so the caller can take medians)
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEMORY_SIZE (2u << 20)
#define ENTRY 0x8000
#define PML4 0x1000
#define PDPT 0x2000
#define PD 0x3000

static void die(const char *what)
{
	fprintf(stderr, "%s failed: %s\n", what, strerror(errno));
	exit(1);
}

static double clock_of(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void segment(struct kvm_segment *s, uint16_t selector, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = selector;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->l = code;        /* 64-bit code segment */
	s->db = !code;
	s->g = 1;
}

/* One VM: made, run to HLT, destroyed.  Returns the console's length. */
static size_t cycle(int kvm, int run_size, const uint8_t *image, size_t image_size, char *console, size_t room)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEMORY_SIZE, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT), *pd = (uint64_t *)(mem + PD);
	pml4[0] = PDPT | 3;
	pdpt[0] = PD | 3;
	for (uint64_t i = 0; i < 512; i++)
		pd[i] = (i << 21) | 0x83; /* present, writable, 2 MiB page */
	memcpy(mem + ENTRY, image, image_size);

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	segment(&sregs.cs, 0x8, 0xb, 1);
	segment(&sregs.ds, 0x10, 0x3, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr3 = PML4;
	sregs.cr4 = 1u << 5;                      /* PAE */
	sregs.cr0 = 0x80000011u;                  /* PG | ET | PE */
	sregs.efer = (1u << 8) | (1u << 10);      /* LME | LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = ENTRY, .rsp = 0x7000, .rflags = 2};
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	size_t length = 0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			if (run->io.direction == KVM_EXIT_IO_IN)
				*data = run->io.port == 0x3fd ? 0x60 : 0xff; /* LSR: THRE | TEMT */
			else if (run->io.port == 0x3f8 && length + 1 < room)
				console[length++] = (char)*data;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
		exit(1);
	}
	console[length] = 0;
	munmap(run, run_size);
	close(vcpu);
	close(vm);
	munmap(mem, MEMORY_SIZE);
	return length;
}

/* N lives, each timed on its own; one JSON line on stdout. */
static void measure(int kvm, int run_size, const uint8_t *image, size_t image_size, unsigned n)
{
	char console[256] = "";
	double *life_cpu = calloc(n ? n : 1, sizeof(double)), *life_wall = calloc(n ? n : 1, sizeof(double));
	if (!life_cpu || !life_wall)
		die("calloc");
	double start = clock_of(CLOCK_MONOTONIC), cpu_start = clock_of(CLOCK_THREAD_CPUTIME_ID);
	for (unsigned i = 0; i < n; i++) {
		double wall = clock_of(CLOCK_MONOTONIC), cpu = clock_of(CLOCK_THREAD_CPUTIME_ID);
		cycle(kvm, run_size, image, image_size, console, sizeof(console));
		life_cpu[i] = clock_of(CLOCK_THREAD_CPUTIME_ID) - cpu;
		life_wall[i] = clock_of(CLOCK_MONOTONIC) - wall;
	}
	double seconds = clock_of(CLOCK_MONOTONIC) - start, cpu_seconds = clock_of(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
	printf("{\"cycles\": %u, \"seconds\": %.6f, \"cpu_seconds\": %.6f", n, seconds, cpu_seconds);
	const char *names[2] = {"life_cpu_us", "life_wall_us"};
	double *lives[2] = {life_cpu, life_wall};
	for (int k = 0; k < 2; k++) {
		printf(", \"%s\": [", names[k]);
		for (unsigned i = 0; i < n; i++)
			printf(i ? ", %.1f" : "%.1f", lives[k][i] * 1e6);
		printf("]");
	}
	printf(", \"console\": \"");
	for (char *c = console; *c; c++)
		printf(*c == '\n' ? "\\n" : "%c", *c);
	printf("\"}\n");
	fflush(stdout);
	free(life_cpu);
	free(life_wall);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: kvm_vm_cycle GUEST.bin N|-\n");
		return 2;
	}
	static uint8_t image[1 << 16];
	FILE *file = fopen(argv[1], "rb");
	if (!file)
		die("open guest binary");
	size_t image_size = fread(image, 1, sizeof(image), file);
	fclose(file);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	if (strcmp(argv[2], "-") == 0) {
		/* Serve: each line on stdin is a count of lives to measure now; an empty line or EOF ends. */
		char line[32];
		while (fgets(line, sizeof(line), stdin) && line[0] != '\n')
			measure(kvm, run_size, image, image_size, (unsigned)strtoul(line, NULL, 0));
	} else {
		measure(kvm, run_size, image, image_size, (unsigned)strtoul(argv[2], NULL, 0));
	}
	close(kvm);
	return 0;
}
