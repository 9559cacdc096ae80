//! The cuda backend's launches (`launches.rs`) run through `kernels.cu` compiled for
//! the CPU (bench/cuda-kernels/host.cpp), against the cpu kernels: argument order,
//! grids, indexing, dtype conversion (bit for bit), reductions and formulas, on a
//! machine without a GPU. The GPU's own math library and cuBLAS are not covered here
//! (bench/gpu-check.sh does that on a GPU).
//!
//! Runs when `FERRY_CUDA_HOST_KERNELS` names the library; bench/cuda-kernels-compile.sh
//! builds it and runs these tests. Otherwise each test says it was skipped.

use std::ffi::{c_char, c_void, CString};

use ferry_core::model::Dtype;

use super::device::dtype_code;
use super::kernels::{check_args, Arg};
use super::launches::{self, Launch};
use crate::backend::{AttentionShape, Backend, CpuBackend, DeviceBuffer, HostBytes, KvLayout};
use crate::kernels::{self, element_bytes};

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, *mut *mut c_void) -> i32;

fn launcher() -> Option<LaunchFn> {
    let Ok(path) = std::env::var("FERRY_CUDA_HOST_KERNELS") else {
        eprintln!("FERRY_CUDA_HOST_KERNELS is not set: kernels.cu host emulation skipped");
        return None;
    };
    let c_path = CString::new(path.clone()).unwrap();
    // SAFETY: loading a library built from host.cpp; its one symbol has the LaunchFn signature.
    unsafe {
        let handle = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW);
        assert!(!handle.is_null(), "could not load {path}");
        let symbol = libc::dlsym(handle, c"ferry_host_launch".as_ptr());
        assert!(!symbol.is_null(), "{path} has no ferry_host_launch");
        Some(std::mem::transmute::<*mut c_void, LaunchFn>(symbol))
    }
}

/// Runs `launch` on the host; its pointers are host addresses.
fn run(launch_fn: LaunchFn, launch: Launch) {
    check_args(launch.kernel, &launch.args).unwrap();
    let Some(config) = launch.config else { return };
    let mut params: Vec<*mut c_void> = launch
        .args
        .iter()
        .map(|arg| match arg {
            Arg::Ptr(v) => v as *const u64 as *mut c_void,
            Arg::I64(v) => v as *const i64 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
        })
        .collect();
    let name = CString::new(launch.kernel.name()).unwrap();
    // SAFETY: each parameter points at a live value of the kernel's declared type
    // (checked above); the buffers behind pointer arguments are the caller's, sized
    // as the device path checks them.
    let status = unsafe { launch_fn(name.as_ptr(), config.grid_dim.0, config.block_dim.0, params.as_mut_ptr()) };
    assert_eq!(status, 0, "{} unknown to the host library", launch.kernel.name());
}

fn addr<T>(values: &[T]) -> u64 {
    values.as_ptr() as u64
}

fn addr_mut<T>(values: &mut [T]) -> u64 {
    values.as_mut_ptr() as u64
}

/// Deterministic values in about [-2, 2].
fn wave(count: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// f32 values as the cpu backend's memory.
fn host_buffer(values: &[f32]) -> DeviceBuffer {
    let mut h = HostBytes::heap(values.len() * 4);
    h.as_f32_mut().copy_from_slice(values);
    DeviceBuffer::Host(h)
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * element_bytes(dtype)];
    kernels::from_f32(dtype, values, &mut bytes);
    bytes
}

fn assert_near(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * scale, "{what} [{i}]: {g} vs {w}");
    }
}

/// Special and random f32 bit patterns: zeros, infinities, NaNs with payloads, the
/// f16/bf16 rounding ties and overflow edges, subnormals of every format.
fn conversion_inputs() -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0x7F80_0001,
        0xFFA0_1234,
        0x7F7F_FFFF,
        0x0080_0000,
        0x0000_0001,
        0x807F_FFFF,
        0x3F80_8000,
        0x3F81_8000,
        0x3F80_8001,
        0x477F_E000,
        0x477F_F000,
        0x4780_0000,
        0x3380_0000,
        0x3300_0000,
        0x3300_0001,
        0x3870_0000,
        0x3880_1000,
        0x387F_F000,
    ];
    let mut x: u32 = 0x1234_5678;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bits.push(x);
    }
    bits.into_iter().map(f32::from_bits).collect()
}

#[test]
fn dtype_conversions_are_bit_identical_to_the_cpu() {
    let Some(f) = launcher() else { return };
    let values = conversion_inputs();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        // Encode through store_kv: one sequence, one position, a row of every value.
        let layout = KvLayout { dtype, sequences: 1, capacity: 1, row_bytes: values.len() * element_bytes(dtype) };
        let mut cache = vec![0u8; layout.bytes()];
        run(f, launches::store_kv(addr(&values), addr_mut(&mut cache), layout, 1, 0, 1).unwrap());
        let stored = &cache[layout.offset(1, 0, 0)..];
        assert!(stored == encode(dtype, &values).as_slice(), "{dtype:?}: encoded bytes differ");
        assert!(cache[..layout.offset(1, 0, 0)].iter().all(|&b| b == 0), "{dtype:?}: wrote the K half");
        // Decode back, from an odd address too (weights may sit at any offset).
        for shift in [0usize, 1] {
            let mut src = vec![0u8; shift];
            src.extend_from_slice(stored);
            let mut got = vec![0f32; values.len()];
            run(
                f,
                launches::decode(addr(&src) + shift as u64, dtype_code(dtype).unwrap(), addr_mut(&mut got), got.len()),
            );
            let mut want = vec![0f32; values.len()];
            kernels::to_f32(dtype, stored, &mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{dtype:?} shift {shift} [{i}]: {g} vs {w}");
            }
        }
    }
}

#[test]
fn row_kernels_match_the_cpu() {
    let Some(f) = launcher() else { return };
    let (rows, width, vocab) = (5, 48, 11);
    // embed: rows of a bf16 table.
    let table = encode(Dtype::Bf16, &wave(vocab * width, 1));
    let tokens: Vec<i64> = vec![3, 0, 10, 3, 7];
    let mut got = vec![0f32; rows * width];
    run(f, launches::embed(addr(&table), 2, addr(&tokens), rows, width, addr_mut(&mut got)));
    let mut want = vec![0f32; rows * width];
    for (t, row) in tokens.iter().zip(want.chunks_exact_mut(width)) {
        let at = *t as usize * width * 2;
        kernels::to_f32(Dtype::Bf16, &table[at..at + width * 2], row);
    }
    assert_eq!(got, want, "embed");
    // rms_norm with an f16 weight.
    let x = wave(rows * width, 2);
    let weight = encode(Dtype::F16, &wave(width, 3));
    let mut got = vec![0f32; rows * width];
    run(f, launches::rms_norm(addr(&x), addr(&weight), 1, width, 1e-5, addr_mut(&mut got), rows).unwrap());
    let mut w = vec![0f32; width];
    kernels::to_f32(Dtype::F16, &weight, &mut w);
    let mut want = vec![0f32; rows * width];
    kernels::rms_norm(&x, &w, 1e-5, &mut want);
    assert_near("rms_norm", &got, &want, 1e-6);
    // rope over 4 heads of 12.
    let (heads, head_dim) = (4, 12);
    let positions = [0usize, 1, 7, 300, 4095];
    let frequencies = ferry_core::model::rope_frequencies(10000.0, head_dim, None, None);
    let (pos, inv_freq) = launches::rope_tables(&positions, &frequencies);
    let tables = (addr(&pos), addr(&inv_freq));
    for layout in [kernels::RopeLayout::Halves, kernels::RopeLayout::Pairs] {
        let mut got = wave(rows * heads * head_dim, 4);
        let mut want = got.clone();
        run(f, launches::rope(addr_mut(&mut got), rows, heads, head_dim, tables, layout));
        kernels::rope(&mut want, heads, head_dim, &positions, &frequencies, layout);
        assert_near("rope", &got, &want, 1e-6);
    }
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(f) = launcher() else { return };
    let count = 1000;
    let (up, delta) = (wave(count, 5), wave(count, 6));
    let mut got = wave(count, 7);
    let mut want = got.clone();
    run(f, launches::pairwise(super::kernels::Kernel::SiluMul, addr_mut(&mut got), addr(&up), count));
    kernels::silu_mul(&mut want, &up);
    assert_near("silu_mul", &got, &want, 1e-6);
    run(f, launches::pairwise(super::kernels::Kernel::Add, addr_mut(&mut got), addr(&delta), count));
    want.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
    assert_eq!(got, want, "add");
    // A bf16 bias on columns 3 .. 13 of 20-wide rows.
    let (rows, stride, col0, width) = (50, 20, 3, 10);
    let bias = encode(Dtype::Bf16, &wave(width, 8));
    let mut got = wave(rows * stride, 9);
    let mut want = got.clone();
    run(f, launches::add_bias(addr_mut(&mut got), addr(&bias), 2, rows, stride, col0, width));
    let mut b = vec![0f32; width];
    kernels::to_f32(Dtype::Bf16, &bias, &mut b);
    kernels::add_bias(&mut want, &b, stride, col0);
    assert_eq!(got, want, "add_bias");
    // gather_rows and rows_finite.
    let x = wave(rows * stride, 10);
    let list: Vec<i64> = vec![49, 0, 17];
    let mut got = vec![0f32; list.len() * stride];
    run(f, launches::gather_rows(addr(&x), stride, addr(&list), list.len(), addr_mut(&mut got)));
    let want: Vec<f32> = list.iter().flat_map(|&r| x[r as usize * stride..][..stride].to_vec()).collect();
    assert_eq!(got, want, "gather_rows");
    // add_scaled_rows: three rows of an expert's output summed in with their weights.
    let y = wave(list.len() * stride, 11);
    let scales = [0.25f32, -1.5, 0.7];
    let mut got = x.clone();
    run(f, launches::add_scaled_rows(addr_mut(&mut got), stride, addr(&list), addr(&scales), list.len(), addr(&y)));
    let (mut want, rows): (_, Vec<usize>) = (host_buffer(&x), list.iter().map(|&r| r as usize).collect());
    CpuBackend::default().add_scaled_rows(&mut want, stride, &rows, &scales, &host_buffer(&y)).unwrap();
    assert_eq!(got, CpuBackend::default().download_f32(&want).unwrap(), "add_scaled_rows");
    let mut with_nan = x.clone();
    with_nan[17 * stride + 4] = f32::NAN;
    with_nan[30 * stride] = f32::INFINITY;
    let cases: [(&Vec<f32>, Vec<i64>, bool); 4] = [
        (&x, list.clone(), true),
        (&with_nan, list, false),
        (&with_nan, vec![30], false),
        (&with_nan, vec![0, 1, 2], true),
    ];
    for (data, checked, finite) in cases {
        let mut found = [0u32];
        run(f, launches::rows_finite(addr(data), stride, addr(&checked), checked.len(), addr_mut(&mut found)));
        assert_eq!(found[0] == 0, finite, "rows_finite {checked:?}");
    }
}

/// Attention through the cpu backend and through the kernel, over the same KV block:
/// grouped and plain heads, prefill and decode, more positions than a block has
/// threads, heads wider than a block, f32/f16/bf16 caches.
#[test]
fn attention_matches_the_cpu() {
    let Some(f) = launcher() else { return };
    for (past, new, heads, kv_heads, head_dim, dtype) in [
        (0, 5, 4, 2, 16, Dtype::F32),
        (3, 2, 8, 2, 64, Dtype::Bf16),
        (200, 1, 4, 4, 20, Dtype::F16),
        (130, 3, 2, 1, 130, Dtype::Bf16),
    ] {
        let sequences = 2;
        let kv_dim = kv_heads * head_dim;
        let layout = KvLayout { dtype, sequences, capacity: past + new + 3, row_bytes: kv_dim * element_bytes(dtype) };
        let cache = encode(dtype, &wave(layout.bytes() / element_bytes(dtype), 11));
        let q = wave(sequences * new * heads * head_dim, 12);
        let shape = AttentionShape { past, new, heads, kv_heads, head_dim };
        let mut got = vec![f32::NAN; q.len()];
        run(f, launches::attention(addr(&q), addr(&cache), layout, shape, addr_mut(&mut got)).unwrap());
        let host = |bytes: &[u8]| {
            let mut h = HostBytes::heap(bytes.len());
            h.as_bytes_mut().copy_from_slice(bytes);
            DeviceBuffer::Host(h)
        };
        let q_bytes: Vec<u8> = q.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = DeviceBuffer::Host(HostBytes::heap(q.len() * 4));
        CpuBackend::default().attention(&host(&q_bytes), &host(&cache), layout, shape, &mut out).unwrap();
        let want = CpuBackend::default().download_f32(&out).unwrap();
        assert_near(&format!("attention {past}+{new} {heads}/{kv_heads}×{head_dim} {dtype:?}"), &got, &want, 1e-5);
    }
}
