//! The forward pass's CUDA kernels (`kernels.cu`): compiled by NVRTC when the backend
//! opens (for the device's own architecture; the build machine needs no CUDA toolkit),
//! loaded as one module, and launched with arguments checked against each kernel's
//! declared parameter list, the one mistake the compiler cannot catch across the
//! Rust/CUDA boundary. The tests below hold those declarations to the source text.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use crate::EngineError;

/// The kernels' CUDA C source.
pub(super) const SOURCE: &str = include_str!("kernels.cu");

/// Threads per block of `ferry_rms_norm` (`NORM_THREADS` in the source).
pub(super) const NORM_THREADS: u32 = 256;
/// Threads per block of `ferry_attention` (`ATTN_THREADS`).
pub(super) const ATTN_THREADS: u32 = 128;
/// The widest head `ferry_attention` takes (`ATTN_MAX_HEAD_DIM`).
pub(super) const ATTN_MAX_HEAD_DIM: usize = 512;
/// Threads per block of the element-wise kernels.
pub(super) const ELEMENTWISE_THREADS: u32 = 256;
/// Most blocks an element-wise launch uses; its grid-stride loop covers the rest.
const MAX_ELEMENTWISE_BLOCKS: u64 = 1 << 16;

/// One kernel parameter's kind: a device pointer, an `i64`, or an `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ptr,
    I64,
    F32,
}

/// An argument as launched.
#[derive(Debug, Clone, Copy)]
pub(super) enum Arg {
    Ptr(u64),
    I64(i64),
    F32(f32),
}

impl Arg {
    fn kind(&self) -> Kind {
        match self {
            Arg::Ptr(_) => Kind::Ptr,
            Arg::I64(_) => Kind::I64,
            Arg::F32(_) => Kind::F32,
        }
    }
}

/// Sizes and offsets as kernel arguments (they fit: device buffers are far below 2⁶³ bytes).
pub(super) fn n(value: usize) -> Arg {
    Arg::I64(value as i64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    Decode,
    Embed,
    Rope,
    StoreKv,
    SiluMul,
    Add,
    AddBias,
    GatherRows,
    AddScaledRows,
    RowsFinite,
    RmsNorm,
    Attention,
}

use Kind::{Ptr, F32, I64};

impl Kernel {
    pub(super) const ALL: [Kernel; 12] = [
        Kernel::Decode,
        Kernel::Embed,
        Kernel::Rope,
        Kernel::StoreKv,
        Kernel::SiluMul,
        Kernel::Add,
        Kernel::AddBias,
        Kernel::GatherRows,
        Kernel::AddScaledRows,
        Kernel::RowsFinite,
        Kernel::RmsNorm,
        Kernel::Attention,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Decode => "ferry_decode",
            Kernel::Embed => "ferry_embed",
            Kernel::Rope => "ferry_rope",
            Kernel::StoreKv => "ferry_store_kv",
            Kernel::SiluMul => "ferry_silu_mul",
            Kernel::Add => "ferry_add",
            Kernel::AddBias => "ferry_add_bias",
            Kernel::GatherRows => "ferry_gather_rows",
            Kernel::AddScaledRows => "ferry_add_scaled_rows",
            Kernel::RowsFinite => "ferry_rows_finite",
            Kernel::RmsNorm => "ferry_rms_norm",
            Kernel::Attention => "ferry_attention",
        }
    }

    /// The parameter list as `kernels.cu` declares it.
    pub(super) fn params(self) -> &'static [Kind] {
        match self {
            Kernel::Decode => &[Ptr, I64, Ptr, I64],
            Kernel::Embed => &[Ptr, I64, Ptr, I64, I64, Ptr],
            Kernel::Rope => &[Ptr, I64, I64, I64, Ptr, Ptr, I64],
            Kernel::StoreKv => &[Ptr, Ptr, I64, I64, I64, I64, I64, I64, I64, I64],
            Kernel::SiluMul => &[Ptr, Ptr, I64],
            Kernel::Add => &[Ptr, Ptr, I64],
            Kernel::AddBias => &[Ptr, Ptr, I64, I64, I64, I64, I64],
            Kernel::GatherRows => &[Ptr, I64, Ptr, I64, Ptr],
            Kernel::AddScaledRows => &[Ptr, I64, Ptr, Ptr, I64, Ptr],
            Kernel::RowsFinite => &[Ptr, I64, Ptr, I64, Ptr],
            Kernel::RmsNorm => &[Ptr, Ptr, I64, I64, F32, Ptr],
            Kernel::Attention => &[Ptr, Ptr, I64, I64, I64, I64, I64, I64, I64, I64, I64, Ptr],
        }
    }
}

/// The loaded module's functions, in `Kernel::ALL` order.
pub(super) struct Kernels {
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// Compiles the source for `ctx`'s device and loads it. NVRTC's log comes with a
    /// compile error (it names the line); a driver older than NVRTC refuses the PTX.
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, EngineError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| EngineError::Device(format!("reading the GPU's compute capability: {e}")))?;
        let options = CompileOptions {
            // Rust never contracts a*b+c into one rounding; neither may the kernels.
            fmad: Some(false),
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            name: Some("ferry_kernels.cu".into()),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, options).map_err(|e| compile_error(&e))?;
        let module = ctx.load_module(ptx).map_err(|e| {
            EngineError::Device(format!(
                "loading the compiled kernels into the GPU failed: {e} (an NVRTC newer than the driver \
                 writes PTX the driver cannot read: update the NVIDIA driver or use an NVRTC of the \
                 driver's CUDA version)"
            ))
        })?;
        let mut functions = Vec::new();
        for kernel in Kernel::ALL {
            let function = module.load_function(kernel.name()).map_err(|e| {
                EngineError::Device(format!("kernel {} is missing from the module: {e}", kernel.name()))
            })?;
            functions.push(function);
        }
        Ok(Kernels { functions })
    }

    /// Launches `kernel` on `stream` with `args`, after checking them against its
    /// parameter list.
    pub(super) fn launch(
        &self,
        stream: &CudaStream,
        kernel: Kernel,
        config: LaunchConfig,
        args: &[Arg],
    ) -> Result<(), EngineError> {
        check_args(kernel, args)?;
        let index = Kernel::ALL.iter().position(|&k| k == kernel).unwrap_or(0);
        let function = self
            .functions
            .get(index)
            .ok_or_else(|| EngineError::Internal(format!("kernel {} not loaded", kernel.name())))?;
        let mut builder = stream.launch_builder(function);
        for arg in args {
            match arg {
                Arg::Ptr(value) => builder.arg(value),
                Arg::I64(value) => builder.arg(value),
                Arg::F32(value) => builder.arg(value),
            };
        }
        // SAFETY: the arguments match the kernel's declared parameters in number and
        // type (checked above; the declarations are tested against kernels.cu), and the
        // caller has checked every pointer's extent against what the kernel touches.
        unsafe { builder.launch(config) }
            .map(|_| ())
            .map_err(|e| EngineError::Device(format!("launching {}: {e}", kernel.name())))
    }
}

pub(super) fn check_args(kernel: Kernel, args: &[Arg]) -> Result<(), EngineError> {
    let kinds: Vec<Kind> = args.iter().map(Arg::kind).collect();
    if kinds != kernel.params() {
        return Err(EngineError::Internal(format!(
            "{} takes {:?}, was given {kinds:?}",
            kernel.name(),
            kernel.params()
        )));
    }
    Ok(())
}

fn compile_error(e: &CompileError) -> EngineError {
    let detail = match e {
        CompileError::CompileError { nvrtc, options, log } => {
            format!("{nvrtc:?} with options {options:?}:\n{}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    };
    EngineError::Device(format!("NVRTC could not compile Ferry's CUDA kernels: {detail}"))
}

/// An element-wise launch over `count` elements; `None` when there are none (a grid
/// of zero blocks is an error).
pub(super) fn elementwise(count: usize) -> Option<LaunchConfig> {
    if count == 0 {
        return None;
    }
    let blocks = (count as u64).div_ceil(ELEMENTWISE_THREADS as u64).min(MAX_ELEMENTWISE_BLOCKS);
    Some(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ELEMENTWISE_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// `blocks` blocks of `threads` (one per row, per attention head…); `None` for none.
pub(super) fn per_block(blocks: usize, threads: u32) -> Result<Option<LaunchConfig>, EngineError> {
    if blocks == 0 {
        return Ok(None);
    }
    // The x dimension of a grid takes up to 2³¹ − 1 blocks.
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| EngineError::Unsupported(format!("{blocks} blocks are more than one CUDA launch takes")))?;
    Ok(Some(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter kinds of `name`'s declaration in the source.
    fn declared(name: &str) -> Vec<Kind> {
        let start = SOURCE
            .find(&format!("\nextern \"C\" __global__ void {name}("))
            .unwrap_or_else(|| panic!("{name} is not declared in kernels.cu"));
        let rest = &SOURCE[start..];
        let params = &rest[rest.find('(').unwrap() + 1..rest.find(')').unwrap()];
        params
            .split(',')
            .map(|p| {
                let p = p.trim();
                if p.contains('*') {
                    Ptr
                } else if p.starts_with("i64 ") {
                    I64
                } else if p.starts_with("float ") {
                    F32
                } else {
                    panic!("{name}: parameter '{p}' is neither a pointer, an i64 nor a float")
                }
            })
            .collect()
    }

    #[test]
    fn every_kernel_is_declared_with_the_parameters_rust_passes() {
        for kernel in Kernel::ALL {
            assert_eq!(declared(kernel.name()), kernel.params(), "{}", kernel.name());
        }
        // And the source defines no kernel Rust does not know.
        let count = SOURCE.lines().filter(|l| l.starts_with("extern \"C\" __global__ void ")).count();
        assert_eq!(count, Kernel::ALL.len());
    }

    #[test]
    fn block_sizes_match_the_source() {
        let define = |name: &str| -> u64 {
            let line = SOURCE.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap();
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(define("NORM_THREADS"), NORM_THREADS as u64);
        assert_eq!(define("ATTN_THREADS"), ATTN_THREADS as u64);
        assert_eq!(define("ATTN_MAX_HEAD_DIM"), ATTN_MAX_HEAD_DIM as u64);
        // Every head dimension up to the maximum has a thread to hold it.
        assert!(define("ATTN_DIMS_PER_THREAD") * ATTN_THREADS as u64 >= ATTN_MAX_HEAD_DIM as u64);
        // The reductions halve the block: powers of two only.
        assert!(NORM_THREADS.is_power_of_two() && ATTN_THREADS.is_power_of_two());
    }

    #[test]
    fn dtype_codes_match_the_source() {
        use ferry_core::model::Dtype;
        for (name, dtype) in [("DTYPE_F32", Dtype::F32), ("DTYPE_F16", Dtype::F16), ("DTYPE_BF16", Dtype::Bf16)] {
            let line = SOURCE.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap();
            let code: i64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
            assert_eq!(super::super::device::dtype_code(dtype).unwrap(), code, "{name}");
        }
    }

    #[test]
    fn wrong_arguments_are_refused_before_launch() {
        assert!(check_args(Kernel::Add, &[Arg::Ptr(0), Arg::Ptr(0), n(3)]).is_ok());
        assert!(check_args(Kernel::Add, &[Arg::Ptr(0), Arg::Ptr(0)]).is_err());
        assert!(check_args(Kernel::Add, &[Arg::Ptr(0), Arg::I64(0), n(3)]).is_err());
        assert!(
            check_args(Kernel::RmsNorm, &[Arg::Ptr(0), Arg::Ptr(0), n(0), n(4), Arg::F32(1e-5), Arg::Ptr(0)]).is_ok()
        );
    }

    #[test]
    fn launch_sizes_cover_every_element() {
        assert!(elementwise(0).is_none());
        for count in [1usize, 255, 256, 257, 1 << 20, 1 << 30, 5_000_000_000] {
            let c = elementwise(count).unwrap();
            let (blocks, threads) = (c.grid_dim.0 as u64, c.block_dim.0 as u64);
            assert!((1..=MAX_ELEMENTWISE_BLOCKS).contains(&blocks));
            // Either one thread per element, or the grid-stride loop covers the rest.
            assert!(blocks * threads >= count as u64 || blocks == MAX_ELEMENTWISE_BLOCKS, "{count}");
            assert!((blocks - 1) * threads < count as u64, "{count}: no idle block");
        }
        assert!(per_block(0, 128).unwrap().is_none());
        assert_eq!(per_block(3 * 32, 128).unwrap().unwrap().grid_dim, (96, 1, 1));
        assert!(per_block(1 << 31, 128).is_err());
    }
}
