/* How fast this machine hands out fresh memory: maps SIZE GiB, advises huge pages (as dmd2's
 * big buffers are), writes one byte per 4 KiB page on THREADS threads, twice (the second time
 * in a fresh mapping right after the first was unmapped), and prints the seconds of each.
 *
 *   cc -O2 -pthread scripts/first_touch.c -o /tmp/first_touch && /tmp/first_touch 8 2
 *
 * On a VM whose host takes back free guest memory, the first pass is the price of memory the
 * guest has not touched lately; the second, of memory just freed. (Linux only.) */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static size_t bytes;
static int threads;
static char *mem;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *touch(void *arg) {
    size_t part = bytes / threads, start = (size_t)arg * part;
    for (size_t i = start; i < start + part; i += 4096) mem[i] = 1;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: first_touch SIZE_GIB THREADS\n");
        return 2;
    }
    bytes = (size_t)(atof(argv[1]) * (1 << 30));
    threads = atoi(argv[2]);
    if (threads < 1 || threads > 64 || bytes == 0) {
        fprintf(stderr, "first_touch: SIZE_GIB > 0, 1 <= THREADS <= 64\n");
        return 2;
    }
    for (int pass = 1; pass <= 2; pass++) {
        mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("first_touch: mmap");
            return 1;
        }
        madvise(mem, bytes, MADV_HUGEPAGE);
        double t = now();
        pthread_t ids[64];
        for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, touch, (void *)(size_t)i);
        for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
        printf("pass %d: %.1f GiB on %d thread(s) in %.2f s\n", pass, atof(argv[1]), threads,
               now() - t);
        munmap(mem, bytes);
    }
    return 0;
}
