/*
 * Baseline for benchmarks/bench_kvm_exit.py: the cost of one port-I/O exit
 * handled by the smallest possible C VMM on the raw KVM API.
 *
 * The guest (real mode, CPL0; the same bytes bench_kvm_exit.py runs through
 * labkit's KvmBackend):
 *
 *   0x8000: 66 b9 NN NN NN NN   mov ecx, N
 *   0x8006: e6 10               out 0x10, al      <- one KVM_EXIT_IO per iteration
 *   0x8008: 66 49               dec ecx
 *   0x800a: 75 fa               jnz 0x8006
 *   0x800c: f4                  hlt
 *
 * Per exit the VMM does what any VMM must: check the exit reason and read the
 * written byte at kvm_run + io.data_offset.  No sync regs (a C VMM that does
 * not need RIP would not ask for them).
 *
 * Usage: kvm_exit_loop N  ->  prints {"exits": N, "seconds": t, "cpu_seconds": c, "us_per_exit": x}
 * (seconds: wall clock; cpu_seconds: this thread's CPU time, user + kernel, which leaves out the
 * time other processes had the CPU: the fair measure on a shared, loaded machine)
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

static void die(const char *what)
{
	fprintf(stderr, "%s failed: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : 20000;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .flags = KVM_MEM_LOG_DIRTY_PAGES, .guest_phys_addr = 0,
		.memory_size = MEMORY_SIZE, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	uint8_t code[] = {0x66, 0xb9, 0, 0, 0, 0, 0xe6, 0x10, 0x66, 0x49, 0x75, 0xfa, 0xf4};
	memcpy(code + 2, &n, 4);
	memcpy(mem + ENTRY, code, sizeof(code));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = ENTRY, .rsp = 0x7000, .rflags = 2};
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	uint64_t exits = 0, sum = 0;
	double start = now(), cpu_start = cpu_now();
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			sum += *((uint8_t *)run + run->io.data_offset);
			exits++;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
		return 1;
	}
	double seconds = now() - start, cpu_seconds = cpu_now() - cpu_start;
	if (exits != n) {
		fprintf(stderr, "expected %u exits, saw %llu\n", n, (unsigned long long)exits);
		return 1;
	}
	printf("{\"exits\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.6f, \"us_per_exit\": %.3f, \"checksum\": %llu}\n",
	       (unsigned long long)exits, seconds, cpu_seconds, seconds * 1e6 / exits, (unsigned long long)sum);
	return 0;
}
