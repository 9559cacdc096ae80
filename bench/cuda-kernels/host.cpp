// kernels.cu compiled for the CPU, to run the very launches the cuda backend makes
// without a GPU (engine/src/backend/cuda/emulated.rs; built by
// bench/cuda-kernels-compile.sh). Each block runs as blockDim.x threads with a real
// barrier for __syncthreads and `static` for __shared__ (blocks run one after
// another, so a block's shared memory is its own). Math is the host's (glibc's expf,
// sinf, ...): this checks the kernels' indexing, conversions, reductions and
// formulas, not the GPU's last-bit accuracy.
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* block_barrier = nullptr;
static void __syncthreads() { block_barrier->arrive_and_wait(); }
static unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
static float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
static float __int_as_float(int u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline

#include "../../engine/src/backend/cuda/kernels.cu"

// Calls `f` with its parameters read from `args`, as cuLaunchKernel's kernelParams:
// args[i] points at the i-th argument's value.
template <typename... A, std::size_t... I>
static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}
template <typename... A>
static void call(void (*f)(A...), void** args) {
    call(f, args, std::index_sequence_for<A...>{});
}

extern "C" int ferry_host_launch(const char* name, unsigned grid, unsigned block, void** args) {
    // One launch at a time: the grid variables and __shared__ arrays are process-wide
    // (and test harnesses call from several threads).
    static std::mutex one_launch;
    std::lock_guard<std::mutex> guard(one_launch);
    std::function<void()> body;
#define KERNEL(k) \
    if (std::strcmp(name, #k) == 0) body = [args] { call(k, args); };
    KERNEL(ferry_decode)
    KERNEL(ferry_embed)
    KERNEL(ferry_rope)
    KERNEL(ferry_store_kv)
    KERNEL(ferry_silu_mul)
    KERNEL(ferry_add)
    KERNEL(ferry_add_bias)
    KERNEL(ferry_gather_rows)
    KERNEL(ferry_add_scaled_rows)
    KERNEL(ferry_rows_finite)
    KERNEL(ferry_rms_norm)
    KERNEL(ferry_attention)
    if (!body) return 1;
    gridDim.x = grid;
    blockDim.x = block;
    std::barrier<> barrier(block);
    block_barrier = &barrier;
    for (unsigned b = 0; b < grid; b++) {
        blockIdx.x = b;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; t++) {
            threads.emplace_back([&body, t] {
                threadIdx.x = t;
                body();
            });
        }
        for (auto& thread : threads) thread.join();
    }
    return 0;
}
