/* The AMX int8 peak of one core, beside popcount_vs_vnni.c's two inner loops.
 *
 * Four independent accumulator tiles (16 rows x 16 int32) each take a tdpbusd of a 16x64 uint8
 * tile by a 64x16 int8 tile (16,384 MACs) per iteration; operands stay in tiles, so this is the
 * instruction's throughput, the ceiling of an int8 (or 2-bit codes held as int8) conv on AMX.
 * Linux needs the process to ask for AMX state first (arch_prctl ARCH_REQ_XCOMP_PERM); the
 * program says so and exits 1 where that is refused or the CPU has no AMX.
 *
 * Build and run (gcc 11+, a CPU with AMX-INT8 such as Sapphire Rapids):
 *   gcc -O2 -mamx-tile -mamx-int8 benchmarks/amx_peak.c -o /tmp/amx && /tmp/amx
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define STEPS 20000000L

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    if (!__builtin_cpu_supports("amx-int8") ||
        syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
        printf("AMX-INT8 not available to this process\n");
        return 1;
    }
    static uint8_t a[16 * 64] __attribute__((aligned(64)));
    static int8_t b[16 * 64] __attribute__((aligned(64)));
    static int32_t c[16 * 16] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 64; i++) {
        a[i] = i % 4;
        b[i] = (int8_t)(i % 4 - 2);
    }
    tile_config config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, a, 64);
    _tile_loadd(5, b, 64);
    _tile_loadd(6, a, 64);
    _tile_loadd(7, b, 64);
    double start = now();
    for (long i = 0; i < STEPS; i++) {
        _tile_dpbusd(0, 4, 5);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 6, 5);
        _tile_dpbusd(3, 6, 7);
    }
    double seconds = now() - start;
    _tile_stored(0, c, 64);
    _tile_release();
    double each = seconds / (4.0 * STEPS);
    printf("AMX tdpbusd: %.3f ns, %.0f GMAC/s a core (16384 MACs an instruction; checksum %d)\n",
           each * 1e9, 16384 / each * 1e-9, c[0]);
    return 0;
}
