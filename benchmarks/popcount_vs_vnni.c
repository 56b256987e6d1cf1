/* The CPU's ceiling for the two inner loops that ResNet-18's 3x3 convs come down to.
 *
 * W2A2 bit-serial: one step is vpandq + vpopcntq + vpaddq on 8 uint64 lanes, 512 one-bit
 * products, i.e. 128 two-bit MACs. int8 (onnxruntime's QLinearConv): one vpdpbusd, 64 MACs.
 * Twelve independent accumulators in registers (the loop unrolled), operands kept opaque to
 * the compiler each iteration so nothing is hoisted out of the loop. Prints nanoseconds per
 * step and GMAC/s of one core.
 *
 * Build and run (any x86-64 CPU with AVX512_VPOPCNTDQ and AVX512_VNNI):
 *   gcc -O2 -march=icelake-server benchmarks/popcount_vs_vnni.c -o /tmp/pv && /tmp/pv
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define STEPS 100000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    __m512i acc[12], a[4], w[3];
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi64(i);
    for (int i = 0; i < 4; i++) a[i] = _mm512_set1_epi64(0x5555 + i);
    for (int i = 0; i < 3; i++) w[i] = _mm512_set1_epi64(0x3333 + i);

    double start = now();
    for (long it = 0; it < STEPS; it++) {
        __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]), "+v"(w[0]),
                         "+v"(w[1]), "+v"(w[2]));
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++)
            acc[j] = _mm512_add_epi64(acc[j],
                                      _mm512_popcnt_epi64(_mm512_and_si512(a[j & 3], w[j >> 2])));
    }
    double popcount = (now() - start) / (STEPS * 12.0);

    start = now();
    for (long it = 0; it < STEPS; it++) {
        __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]), "+v"(w[0]),
                         "+v"(w[1]), "+v"(w[2]));
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a[j & 3], w[j >> 2]);
    }
    double vnni = (now() - start) / (STEPS * 12.0);

    long sink = 0;
    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_epi64(acc[i]);
    printf("W2A2 popcount step: %.3f ns, %.0f GMAC/s a core (128 MACs a step)\n", popcount * 1e9,
           128 / popcount * 1e-9);
    printf("int8 vpdpbusd:      %.3f ns, %.0f GMAC/s a core (64 MACs an instruction)\n",
           vnni * 1e9, 64 / vnni * 1e-9);
    printf("ceiling of W2A2 over int8 at equal efficiency: %.2fx (checksum %ld)\n",
           (128 / popcount) / (64 / vnni), sink);
    return 0;
}
