/* CUDA C on CPU threads: what a raw kernel's exact source needs to compile as C++ and run with a real
   grid and block (dali_scp/emulated_device.py builds one shared library per kernel from this header, the
   kernel's source and a generated entry, and launches it through ctypes).

   Modes (macros set by the Python side):
     DALI_EMU_THREADS   every thread of a block is an OS thread, all running at once (ThreadSanitizer);
                        otherwise every thread runs on the calling thread, one after another in the order
                        asked for (forward or reverse), and a kernel with __syncthreads runs its threads as
                        fibers that switch at the barrier (DALI_EMU_FIBERS).
     DALI_EMU_ALIGN     no sanitizer runtime: -fsanitize=alignment calls the handler below, which turns a
                        misaligned word access (a word path taken on an unaligned address) into an error
                        of the launch instead of a silent unaligned x86 load.
     DALI_EMU_ASAN      fibers tell AddressSanitizer when they switch stacks.
   Blocks always run one after another, so a __shared__ variable (static storage in one section) is
   per block; it is filled with the poison byte at the start of every block. */
#include <cmath>
#include <cstdarg>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <ucontext.h>
#if DALI_EMU_THREADS
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if DALI_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

/* --- the CUDA vocabulary the kernels use ------------------------------------------------------------ */
struct uint3 { unsigned int x, y, z; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

#if DALI_EMU_THREADS
#define DALI_TLS thread_local
#else
#define DALI_TLS
#endif
static DALI_TLS uint3 threadIdx, blockIdx;
static uint3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("dali_emu_shared"), aligned(16)))
extern "C" char __start_dali_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_dali_emu_shared[] __attribute__((weak, visibility("hidden")));

/* round-to-nearest intrinsics: the IEEE operation itself (compiled with -ffp-contract=off, so never fused) */
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }

static inline int __popc(unsigned int v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __clz(int v) { return v ? __builtin_clz((unsigned int)v) : 32; }
static inline int __clzll(long long v) { return v ? __builtin_clzll((unsigned long long)v) : 64; }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline int __ffsll(long long v) { return __builtin_ffsll(v); }
static inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;  /* bytes 0-3 of x, then 4-7 of y */
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}

#define DALI_MINMAX(T) \
    static inline T min(T a, T b) { return a < b ? a : b; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
DALI_MINMAX(int) DALI_MINMAX(unsigned int) DALI_MINMAX(long long) DALI_MINMAX(unsigned long long)
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

/* atomics: relaxed compiler atomics, as CUDA's are (min/max by compare-and-swap) */
#define DALI_ATOMIC_RMW(T) \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); } \
    static inline T atomicCAS(T* p, T cmp, T v) { \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); return cmp; } \
    static inline T atomicMin(T* p, T v) { \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED); \
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old; } \
    static inline T atomicMax(T* p, T v) { \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED); \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old; }
DALI_ATOMIC_RMW(int) DALI_ATOMIC_RMW(unsigned int) DALI_ATOMIC_RMW(long long) DALI_ATOMIC_RMW(unsigned long long)

/* --- errors: the first one of a launch is kept and returned to Python -------------------------------- */
static char dali_err[512];
static int dali_failed;  /* the first of several threads that fail writes the message */
static void dali_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void dali_fail(const char* fmt, ...) {
    if (__atomic_exchange_n(&dali_failed, 1, __ATOMIC_ACQ_REL)) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dali_err, sizeof dali_err, fmt, ap);
    va_end(ap);
}

/* a fault ends the emulated thread: back to the _setjmp in dali_run_thread, on the thread's own stack */
static DALI_TLS jmp_buf* dali_abort_to;
static void dali_abort_thread() { _longjmp(*dali_abort_to, 1); }

#if DALI_EMU_ALIGN
/* the -fsanitize=alignment hook (the ABI of GCC's and LLVM's UBSan runtimes) */
struct DaliSourceLocation { const char* file; unsigned int line, column; };
struct DaliTypeDescriptor { unsigned short kind, info; char name[1]; };
struct DaliTypeMismatch { DaliSourceLocation loc; const DaliTypeDescriptor* type; unsigned char log_alignment, kind; };
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(DaliTypeMismatch* d, void* p) {
    dali_fail("misaligned access: a %s (%u-byte aligned) at address %p, line %u column %u of the kernel "
              "(thread %u of block %u,%u)", d->type->name, 1u << d->log_alignment, p, d->loc.line, d->loc.column,
              threadIdx.x, blockIdx.x, blockIdx.y);
    dali_abort_thread();  /* (the sanitizer's handlers are declared nothrow: no exception can leave them) */
}
#endif

/* --- the kernel's entry (generated after its source) ---------------------------------------------- */
static void dali_emu_entry(void* const* args);
static void* const* dali_args;
static unsigned char dali_poison;

static void dali_poison_shared() {
    if (__start_dali_emu_shared && __stop_dali_emu_shared > __start_dali_emu_shared)
        memset(__start_dali_emu_shared, dali_poison, __stop_dali_emu_shared - __start_dali_emu_shared);
}

static void dali_run_thread() {
    jmp_buf here;
    dali_abort_to = &here;
    if (!_setjmp(here)) dali_emu_entry(dali_args);
}

static unsigned int dali_nblocks, dali_nthreads;
static int dali_reverse;
static uint3 dali_index(unsigned int i, uint3 dim) {  /* the i-th index of a grid or block, x fastest */
    if (dali_reverse) i = (dim.x * dim.y * dim.z) - 1 - i;
    return {i % dim.x, (i / dim.x) % dim.y, i / (dim.x * dim.y)};
}

#if DALI_EMU_THREADS
/* --- every thread of a block an OS thread --------------------------------------------------------------
   A pool of OS threads (one per thread of the largest block so far, kept between launches: creating one
   costs a millisecond under ThreadSanitizer). Synchronisation is by atomics (acquire/release, which
   ThreadSanitizer follows) with futexes only to sleep: a barrier wakes its threads with one system call
   instead of handing a mutex to each in turn. */
static long dali_futex(unsigned int* w, int op, unsigned int v) { return syscall(SYS_futex, w, op, v, nullptr, nullptr, 0); }
static unsigned int dali_load(unsigned int* w) { return __atomic_load_n(w, __ATOMIC_ACQUIRE); }
static void dali_wait_change(unsigned int* w, unsigned int seen) {  /* until *w != seen */
    while (dali_load(w) == seen) dali_futex(w, FUTEX_WAIT_PRIVATE, seen);
}
static void dali_bump(unsigned int* w, int all) {  /* *w += 1, then wake its waiters */
    __atomic_fetch_add(w, 1, __ATOMIC_ACQ_REL);
    dali_futex(w, FUTEX_WAKE_PRIVATE, all ? 0x7fffffff : 1);
}

static unsigned int dali_count, dali_finished, dali_bar_gen, dali_done_gen, dali_block;
struct DaliWorker { unsigned int go; };
static DaliWorker dali_pool[1024];
static unsigned int dali_pool_size;

static void dali_release_barrier(unsigned int finished) {
    __atomic_store_n(&dali_count, finished, __ATOMIC_RELAXED);  /* the finished stay counted */
    dali_bump(&dali_bar_gen, 1);
}

static void __syncthreads() {  /* dali_count: threads waiting at this barrier + threads finished */
    const unsigned int g = dali_load(&dali_bar_gen);
    if (__atomic_add_fetch(&dali_count, 1, __ATOMIC_ACQ_REL) == dali_nthreads) {
        const unsigned int f = __atomic_load_n(&dali_finished, __ATOMIC_ACQUIRE);
        if (f) dali_fail("__syncthreads reached by %u of %u threads of block %u,%u", dali_nthreads - f, dali_nthreads,
                         blockIdx.x, blockIdx.y);
        dali_release_barrier(f);
    } else {
        dali_wait_change(&dali_bar_gen, g);
    }
}

static void dali_thread_finished() {
    const unsigned int n = dali_nthreads;  /* read before the count lets the launcher go on */
    __atomic_add_fetch(&dali_finished, 1, __ATOMIC_ACQ_REL);  /* before the count: the count's last sees it */
    if (__atomic_add_fetch(&dali_count, 1, __ATOMIC_ACQ_REL) != n) return;
    const unsigned int f = __atomic_load_n(&dali_finished, __ATOMIC_ACQUIRE);
    if (f == n) {
        dali_bump(&dali_done_gen, 1);  /* the block is done */
    } else {  /* the rest wait at a barrier no finished thread will reach */
        dali_fail("__syncthreads reached by %u of %u threads of block %u,%u", n - f, n, blockIdx.x, blockIdx.y);
        dali_release_barrier(f);
    }
}

static void* dali_worker(void* arg) {
    const unsigned int t = (unsigned int)(unsigned long long)arg;
    unsigned int seen = 0;
    for (;;) {
        dali_wait_change(&dali_pool[t].go, seen);  /* the launcher starts each block in each of its threads */
        seen = dali_load(&dali_pool[t].go);
        blockIdx = dali_index(dali_block, gridDim);
        threadIdx = dali_index(t, blockDim);
        dali_run_thread();
        dali_thread_finished();
    }
    return nullptr;
}

static void dali_run_grid() {
    for (; dali_pool_size < dali_nthreads; ++dali_pool_size) {
        pthread_t th;
        pthread_create(&th, nullptr, dali_worker, (void*)(unsigned long long)dali_pool_size);
        pthread_detach(th);
    }
    for (unsigned int b = 0; b < dali_nblocks; ++b) {
        dali_poison_shared();
        dali_block = b;
        __atomic_store_n(&dali_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&dali_finished, 0, __ATOMIC_RELAXED);
        const unsigned int done = dali_load(&dali_done_gen);
        for (unsigned int t = 0; t < dali_nthreads; ++t) dali_bump(&dali_pool[t].go, 0);
        dali_wait_change(&dali_done_gen, done);
    }
}

#elif DALI_EMU_FIBERS
/* --- the threads of a block as fibers that switch at __syncthreads ----------------------------------- */
enum { DALI_READY, DALI_AT_BARRIER, DALI_DONE };
struct DaliFiber { jmp_buf ctx; ucontext_t start; char* stack; int state, started; jmp_buf* abort_to; };
static DaliFiber* dali_fibers;
static jmp_buf dali_sched;
static ucontext_t dali_creator;
static unsigned int dali_cur;
static const size_t dali_stack_size = 256 * 1024;
#if DALI_EMU_ASAN
static const void* dali_main_bottom;
static size_t dali_main_size;
#endif

static void dali_to_scheduler() {  /* from a fiber: _setjmp/_longjmp switch stacks without a system call */
#if DALI_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, dali_main_bottom, dali_main_size);
#endif
    if (!_setjmp(dali_fibers[dali_cur].ctx)) _longjmp(dali_sched, 1);
#if DALI_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &dali_main_bottom, &dali_main_size);
#endif
}

static void dali_to_fiber(unsigned int i) {  /* from the scheduler; a fiber's first start is a swapcontext */
    DaliFiber& f = dali_fibers[i];
    dali_cur = i;
#if DALI_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, dali_stack_size);
#endif
    if (!_setjmp(dali_sched)) {
        if (f.started) _longjmp(f.ctx, 1);
        f.started = 1;
        swapcontext(&dali_creator, &f.start);
    }
#if DALI_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

static void __syncthreads() {
    DaliFiber& f = dali_fibers[dali_cur];
    f.state = DALI_AT_BARRIER;
    f.abort_to = dali_abort_to;
    dali_to_scheduler();
    dali_abort_to = f.abort_to;
}

static void dali_fiber_main() {
#if DALI_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &dali_main_bottom, &dali_main_size);
#endif
    for (;;) {
        dali_run_thread();
        dali_fibers[dali_cur].state = DALI_DONE;
        dali_to_scheduler();
    }
}

static void dali_run_grid() {
    dali_fibers = (DaliFiber*)calloc(dali_nthreads, sizeof(DaliFiber));
    char* stacks = (char*)mmap(nullptr, dali_stack_size * dali_nthreads, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    for (unsigned int t = 0; t < dali_nthreads; ++t) {
        DaliFiber& f = dali_fibers[t];
        f.stack = stacks + dali_stack_size * t;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack;
        f.start.uc_stack.ss_size = dali_stack_size;
        f.start.uc_link = nullptr;
        makecontext(&f.start, dali_fiber_main, 0);
    }
    for (unsigned int b = 0; b < dali_nblocks; ++b) {
        blockIdx = dali_index(b, gridDim);
        dali_poison_shared();
        for (unsigned int t = 0; t < dali_nthreads; ++t) dali_fibers[t].state = DALI_READY;
        for (;;) {  /* one phase: every ready thread runs to its next barrier or its end */
            for (unsigned int t = 0; t < dali_nthreads; ++t) {
                if (dali_fibers[t].state != DALI_READY) continue;
                threadIdx = dali_index(t, blockDim);
                dali_to_fiber(t);
            }
            unsigned int waiting = 0;
            for (unsigned int t = 0; t < dali_nthreads; ++t) waiting += dali_fibers[t].state == DALI_AT_BARRIER;
            if (!waiting) break;
            if (waiting < dali_nthreads)
                dali_fail("__syncthreads reached by %u of %u threads of block %u,%u", waiting, dali_nthreads,
                          blockIdx.x, blockIdx.y);
            for (unsigned int t = 0; t < dali_nthreads; ++t)
                if (dali_fibers[t].state == DALI_AT_BARRIER) dali_fibers[t].state = DALI_READY;
        }
    }
    munmap(stacks, dali_stack_size * dali_nthreads);
    free(dali_fibers);
}

#else
/* --- no barrier in the kernel: its threads one after another ------------------------------------------ */
static void dali_run_grid() {
    for (unsigned int b = 0; b < dali_nblocks; ++b) {
        blockIdx = dali_index(b, gridDim);
        dali_poison_shared();
        for (unsigned int t = 0; t < dali_nthreads; ++t) {
            threadIdx = dali_index(t, blockDim);
            dali_run_thread();
        }
    }
}
#endif

extern "C" __attribute__((visibility("default"))) const char* dali_emu_launch(
        void* const* args, const unsigned int* grid, const unsigned int* block, int reverse, int poison) {
    dali_err[0] = 0;
    dali_failed = 0;
    dali_args = args;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    dali_nblocks = grid[0] * grid[1] * grid[2];
    dali_nthreads = block[0] * block[1] * block[2];
    dali_reverse = reverse;
    dali_poison = (unsigned char)poison;
    dali_run_grid();
    return dali_err;
}
