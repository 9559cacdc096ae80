// Minimal stand-ins for what NVRTC provides built in, so clang compiles kernels.cu
// to PTX without a CUDA installation (-nocudainc -nocudalib; bench/cuda-kernels-compile.sh).
// The math functions stay external calls in the PTX: only the source is being checked.
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
#include "__clang_cuda_builtin_vars.h"
extern "C" __device__ float sqrtf(float);
extern "C" __device__ float expf(float);
extern "C" __device__ float sinf(float);
extern "C" __device__ float cosf(float);
extern "C" __device__ float fmaxf(float, float);
static __device__ __forceinline__ unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
static __device__ __forceinline__ float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
static __device__ __forceinline__ float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
