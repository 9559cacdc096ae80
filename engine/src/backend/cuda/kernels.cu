// Ferry's forward-pass kernels for the cuda backend, compiled at run time by NVRTC
// (backend/cuda/kernels.rs). The arithmetic is the CPU kernels' (engine/src/kernels):
// f32 throughout, the same formulas in the same order where the GPU allows it, so the
// cuda engine produces the cpu engine's tokens. NVRTC compiles this with --fmad=false
// for the same reason: Rust never fuses a multiply and an add behind the code's back.
//
// Conventions the Rust side relies on (checked by kernels.rs's tests against this text):
// - every kernel is `extern "C" __global__ void ferry_*`;
// - every integer parameter is `i64` (long long), every pointer a device pointer, every
//   real `float`: Rust passes u64 / i64 / f32 in the same order;
// - dtype codes: 0 = f32, 1 = f16, 2 = bf16;
// - element-wise kernels loop with a grid stride, so any grid covers any length;
// - NORM_THREADS and ATTN_THREADS are the block sizes those kernels are launched with.
//
// No header is included: NVRTC provides the builtins used here (__float_as_uint,
// sqrtf, expf, sinf, cosf, fmaxf), so no CUDA toolkit is needed at run time.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define DTYPE_F32 0
#define DTYPE_F16 1
#define DTYPE_BF16 2

#define NORM_THREADS 256
#define ATTN_THREADS 128
// Head widths up to ATTN_THREADS * ATTN_DIMS_PER_THREAD (the kernel keeps one output
// value per dimension in registers).
#define ATTN_DIMS_PER_THREAD 4
#define ATTN_MAX_HEAD_DIM 512

// ---- dtype conversion: bit-identical to engine/src/kernels/mod.rs (half 2.x) --------

// f16 -> f32, exact. Subnormals are man * 2^-24, which f32 holds exactly.
__device__ __forceinline__ float f16_to_f32(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 exp = h & 0x7C00u;
    u32 man = h & 0x03FFu;
    if (exp == 0x7C00u) {
        // Infinity, or NaN with the quiet bit set and the payload kept (half's rule).
        return __uint_as_float(man == 0 ? (sign | 0x7F800000u) : (sign | 0x7FC00000u | (man << 13)));
    }
    if (exp == 0) {
        float magnitude = (float)man * 5.9604644775390625e-8f;  // 2^-24
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | (((exp >> 10) + 112u) << 23) | (man << 13));
}

// f32 -> f16 with round-to-nearest-even: half::f16::from_f32's software path, line by line.
__device__ __forceinline__ u32 f32_to_f16(float value) {
    u32 x = __float_as_uint(value);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (sign >> 16) | 0x7C00u | nan_bit | (man >> 13);
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) {
        return half_sign | 0x7C00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return half_sign;
        }
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) {
            half_man += 1;
        }
        return half_sign | half_man;
    }
    u32 bits = half_sign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x1000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) {
        bits += 1;
    }
    return bits & 0xFFFFu;
}

// f32 -> bf16 with round-to-nearest-even: half::bf16::from_f32.
__device__ __forceinline__ u32 f32_to_bf16(float value) {
    u32 x = __float_as_uint(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return ((x >> 16) | 0x0040u) & 0xFFFFu;
    }
    u32 round_bit = 0x8000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
        return ((x >> 16) + 1u) & 0xFFFFu;
    }
    return x >> 16;
}

__device__ __forceinline__ i64 element_bytes(i64 dtype) {
    return dtype == DTYPE_F32 ? 4 : 2;
}

// Element `i` of a `dtype` array at `base`, as f32. Weights may sit at any byte offset
// in the buffer they were read into, so an unaligned element is read byte by byte.
__device__ __forceinline__ float load(const u8* base, i64 dtype, i64 i) {
    if (dtype == DTYPE_F32) {
        const u8* p = base + 4 * i;
        if (((unsigned long long)p & 3) == 0) {
            return *(const float*)p;
        }
        return __uint_as_float((u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24));
    }
    const u8* p = base + 2 * i;
    u32 h = (((unsigned long long)p & 1) == 0) ? (u32)(*(const u16*)p) : ((u32)p[0] | ((u32)p[1] << 8));
    // bf16 is the top half of an f32 (engine's to_f32 takes the bits as they are).
    return dtype == DTYPE_F16 ? f16_to_f32(h) : __uint_as_float(h << 16);
}

// Stores `v` as element `i` of a `dtype` array at `base` (KV rows: always aligned).
__device__ __forceinline__ void store(u8* base, i64 dtype, i64 i, float v) {
    if (dtype == DTYPE_F32) {
        *(float*)(base + 4 * i) = v;
    } else {
        *(u16*)(base + 2 * i) = (u16)(dtype == DTYPE_F16 ? f32_to_f16(v) : f32_to_bf16(v));
    }
}

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// ---- element-wise kernels --------------------------------------------------------

// dst[i] = src[i] as f32 (weights widened for cuBLAS).
extern "C" __global__ void ferry_decode(const u8* src, i64 dtype, float* dst, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = load(src, dtype, i); }
}

// Row t of out = row tokens[t] of the table (ids checked on the host).
extern "C" __global__ void ferry_embed(const u8* table, i64 dtype, const i64* tokens, i64 count, i64 cols,
                                       float* out) {
    GRID_STRIDE(i, count * cols) {
        i64 t = i / cols;
        out[i] = load(table, dtype, tokens[t] * cols + i % cols);
    }
}

// Rotary embedding: inv_freq computed on the host exactly as the CPU does. Pair j turns
// elements j and j + head_dim/2 ("rotate half"), or 2j and 2j + 1 where `pairs` is set
// (llama.cpp's layout, for GGUF files' interleaved q/k rows).
extern "C" __global__ void ferry_rope(float* x, i64 rows, i64 heads, i64 head_dim, const float* positions,
                                      const float* inv_freq, i64 pairs) {
    i64 half = head_dim / 2;
    GRID_STRIDE(i, rows * heads * half) {
        i64 j = i % half;
        i64 head = i / half;  // row * heads + h
        i64 row = head / heads;
        float angle = positions[row] * inv_freq[j];
        float s = sinf(angle);
        float c = cosf(angle);
        float* v = x + head * head_dim;
        i64 first = pairs ? 2 * j : j;
        i64 second = pairs ? 2 * j + 1 : j + half;
        float a = v[first];
        float b = v[second];
        v[first] = a * c - b * s;
        v[second] = b * c + a * s;
    }
}

// Writes `new_rows` rows per sequence of f32 keys (half 0) or values (1) into positions
// `position ..` of a KV block laid out as KvLayout: [half][sequence][position][kv row].
extern "C" __global__ void ferry_store_kv(const float* rows, u8* cache, i64 dtype, i64 sequences, i64 capacity,
                                          i64 row_bytes, i64 half, i64 position, i64 new_rows, i64 kv_dim) {
    GRID_STRIDE(i, sequences * new_rows * kv_dim) {
        i64 c = i % kv_dim;
        i64 t = (i / kv_dim) % new_rows;
        i64 seq = i / (kv_dim * new_rows);
        u8* row = cache + ((half * sequences + seq) * capacity + position + t) * row_bytes;
        store(row, dtype, c, rows[i]);
    }
}

// SwiGLU: gate = silu(gate) * up, as kernels::silu_mul writes it.
extern "C" __global__ void ferry_silu_mul(float* gate, const float* up, i64 n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void ferry_add(float* x, const float* delta, i64 n) {
    GRID_STRIDE(i, n) { x[i] += delta[i]; }
}

// Adds a stored bias to columns col0 .. col0 + width of every stride-wide row.
extern "C" __global__ void ferry_add_bias(float* out, const u8* bias, i64 dtype, i64 rows, i64 stride, i64 col0,
                                          i64 width) {
    GRID_STRIDE(i, rows * width) {
        i64 j = i % width;
        out[(i / width) * stride + col0 + j] += load(bias, dtype, j);
    }
}

extern "C" __global__ void ferry_gather_rows(const float* x, i64 width, const i64* rows, i64 count, float* out) {
    GRID_STRIDE(i, count * width) { out[i] = x[rows[i / width] * width + i % width]; }
}

// out[rows[r]] += scales[r] * y[r] for count distinct rows: an expert's output summed
// with its routing weight (a product, then a sum: fmad is off, as on the CPU).
extern "C" __global__ void ferry_add_scaled_rows(float* out, i64 width, const i64* rows, const float* scales,
                                                 i64 count, const float* y) {
    GRID_STRIDE(i, count * width) {
        i64 r = i / width;
        out[rows[r] * width + i % width] += scales[r] * y[i];
    }
}

// Sets *found to 1 if any value of the listed rows is NaN or infinite.
extern "C" __global__ void ferry_rows_finite(const float* x, i64 width, const i64* rows, i64 count, u32* found) {
    GRID_STRIDE(i, count * width) {
        u32 bits = __float_as_uint(x[rows[i / width] * width + i % width]);
        if ((bits & 0x7F800000u) == 0x7F800000u) {
            *found = 1u;
        }
    }
}

// ---- block reductions (blockDim.x a power of two, `scratch` blockDim.x long) --------

__device__ float block_sum(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            scratch[threadIdx.x] += scratch[threadIdx.x + s];
        }
        __syncthreads();
    }
    float total = scratch[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        }
        __syncthreads();
    }
    float total = scratch[0];
    __syncthreads();
    return total;
}

// ---- RMSNorm: one block of NORM_THREADS per row ---------------------------------

extern "C" __global__ void ferry_rms_norm(const float* x, const u8* weight, i64 dtype, i64 width, float eps,
                                          float* out) {
    __shared__ float scratch[NORM_THREADS];
    const float* row = x + (i64)blockIdx.x * width;
    float* dst = out + (i64)blockIdx.x * width;
    float partial = 0.0f;
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) {
        partial += row[c] * row[c];
    }
    float mean_square = block_sum(partial, scratch) / (float)width;
    float scale = 1.0f / sqrtf(mean_square + eps);
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) {
        dst[c] = row[c] * scale * load(weight, dtype, c);
    }
}

// ---- attention: one block of ATTN_THREADS per (sequence, query row, head) -----------

struct AttnRow {
    const u8* keys;    // the sequence's position 0 of K, at this head's KV head
    const u8* values;  // the same in V
    i64 row_bytes;
    i64 dtype;
    i64 head_dim;
    i64 kv_offset;  // elements into a KV row where this head's KV head starts
};

__device__ __forceinline__ float score(const AttnRow& a, const float* q, i64 p, float scale) {
    const u8* k = a.keys + p * a.row_bytes;
    float dot = 0.0f;
    for (i64 d = 0; d < a.head_dim; d++) {
        dot += q[d] * load(k, a.dtype, a.kv_offset + d);
    }
    return dot * scale;
}

// Causal grouped-query attention over positions 0 .. past + t of a KV block
// ([half][sequence][position][kv row], `capacity` positions per sequence), in the CPU
// kernel's three steps: the largest score, the sum of exp(score - max), then the
// values weighted by exp(score - max) / sum. Scores are recomputed rather than kept,
// so any context length fits.
extern "C" __global__ void ferry_attention(const float* q, const u8* cache, i64 dtype, i64 sequences, i64 capacity,
                                           i64 row_bytes, i64 past, i64 new_rows, i64 heads, i64 kv_heads,
                                           i64 head_dim, float* out) {
    __shared__ float q_row[ATTN_MAX_HEAD_DIM];
    __shared__ float weights[ATTN_THREADS];
    __shared__ float scratch[ATTN_THREADS];
    i64 block = blockIdx.x;
    i64 h = block % heads;
    i64 t = (block / heads) % new_rows;
    i64 seq = block / (heads * new_rows);
    AttnRow a;
    a.keys = cache + (seq * capacity) * row_bytes;
    a.values = cache + ((sequences + seq) * capacity) * row_bytes;
    a.row_bytes = row_bytes;
    a.dtype = dtype;
    a.head_dim = head_dim;
    a.kv_offset = (h / (heads / kv_heads)) * head_dim;
    i64 at = ((seq * new_rows + t) * heads + h) * head_dim;
    for (i64 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        q_row[d] = q[at + d];
    }
    __syncthreads();
    float scale = 1.0f / sqrtf((float)head_dim);
    i64 visible = past + t + 1;

    float local_max = -__int_as_float(0x7F800000);
    for (i64 p = threadIdx.x; p < visible; p += blockDim.x) {
        local_max = fmaxf(local_max, score(a, q_row, p, scale));
    }
    float max = block_max(local_max, scratch);
    float local_sum = 0.0f;
    for (i64 p = threadIdx.x; p < visible; p += blockDim.x) {
        local_sum += expf(score(a, q_row, p, scale) - max);
    }
    float sum = block_sum(local_sum, scratch);

    float acc[ATTN_DIMS_PER_THREAD];
    for (int k = 0; k < ATTN_DIMS_PER_THREAD; k++) {
        acc[k] = 0.0f;
    }
    for (i64 base = 0; base < visible; base += blockDim.x) {
        i64 p = base + threadIdx.x;
        weights[threadIdx.x] = p < visible ? expf(score(a, q_row, p, scale) - max) / sum : 0.0f;
        __syncthreads();
        i64 tile = visible - base < (i64)blockDim.x ? visible - base : (i64)blockDim.x;
        for (int k = 0; k < ATTN_DIMS_PER_THREAD; k++) {
            i64 d = threadIdx.x + (i64)k * blockDim.x;
            if (d < head_dim) {
                for (i64 j = 0; j < tile; j++) {
                    const u8* v = a.values + (base + j) * row_bytes;
                    acc[k] += weights[j] * load(v, dtype, a.kv_offset + d);
                }
            }
        }
        __syncthreads();
    }
    for (int k = 0; k < ATTN_DIMS_PER_THREAD; k++) {
        i64 d = threadIdx.x + (i64)k * blockDim.x;
        if (d < head_dim) {
            out[at + d] = acc[k];
        }
    }
}
