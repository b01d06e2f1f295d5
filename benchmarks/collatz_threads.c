/*
 * The host's own ceiling for benchmarks/bench_fleet.py's fleet speed-up: compute64's work
 * (the Collatz step counts of 1..limit) done by T plain host threads, no VM, all at once or
 * one after another.  On 2 idle cores "at once" takes about half the time; on a shared host
 * the scheduler decides how much of the cores this process gets (with autogroup scheduling,
 * a session's threads together get a session's share), and that bounds what any VMM's
 * fleet can gain there, so bench_fleet.py measures this beside it, interleaved.
 *
 * Usage: collatz_threads LIMIT T at-once|one-by-one
 *   -> prints {"seconds": wall, "cpu_seconds": process CPU, "steps": per thread}
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct work {
	uint64_t limit;
	uint64_t steps;
};

static double clock_of(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* compute64's loop: every sequence starting below 2**32 stays below 2**63. */
static void *collatz(void *argument)
{
	struct work *work = argument;
	uint64_t total = 0;
	for (uint64_t n = 1; n <= work->limit; n++) {
		uint64_t x = n;
		while (x != 1) {
			x = (x & 1) ? 3 * x + 1 : x >> 1;
			total++;
		}
	}
	work->steps = total;
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 4 || (strcmp(argv[3], "at-once") && strcmp(argv[3], "one-by-one"))) {
		fprintf(stderr, "usage: collatz_threads LIMIT THREADS at-once|one-by-one\n");
		return 2;
	}
	uint64_t limit = strtoull(argv[1], NULL, 0);
	int threads = atoi(argv[2]);
	if (limit < 1 || limit >> 32 || threads < 1 || threads > 1024) {
		fprintf(stderr, "LIMIT must be in [1, 2**32), THREADS in [1, 1024]\n");
		return 2;
	}
	int together = !strcmp(argv[3], "at-once");
	pthread_t *ids = calloc(threads, sizeof(*ids));
	struct work *works = calloc(threads, sizeof(*works));
	if (!ids || !works)
		return 1;
	double start = clock_of(CLOCK_MONOTONIC), cpu_start = clock_of(CLOCK_PROCESS_CPUTIME_ID);
	for (int i = 0; i < threads; i++) {
		works[i].limit = limit;
		if (pthread_create(&ids[i], NULL, collatz, &works[i])) {
			fprintf(stderr, "pthread_create failed\n");
			return 1;
		}
		if (!together)
			pthread_join(ids[i], NULL);
	}
	if (together)
		for (int i = 0; i < threads; i++)
			pthread_join(ids[i], NULL);
	double seconds = clock_of(CLOCK_MONOTONIC) - start;
	double cpu_seconds = clock_of(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
	for (int i = 1; i < threads; i++)
		if (works[i].steps != works[0].steps)
			return 1;
	printf("{\"seconds\": %.6f, \"cpu_seconds\": %.6f, \"steps\": %llu}\n", seconds, cpu_seconds,
	       (unsigned long long)works[0].steps);
	free(ids);
	free(works);
	return 0;
}
