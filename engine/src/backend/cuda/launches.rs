//! Each kernel launch as data: which kernel, its grid, its arguments in the order
//! `kernels.cu` declares them. The device operations (`device.rs`) launch these on the
//! GPU; the host emulation test (`emulated.rs`) runs the very same launches through
//! kernels.cu compiled for the CPU, so argument order and grid sizes are tested on
//! machines without a GPU.

use cudarc::driver::LaunchConfig;

use super::device::dtype_code;
use super::kernels::{elementwise, n, per_block, Arg, Kernel, ATTN_THREADS, NORM_THREADS};
use crate::backend::{AttentionShape, KvLayout, RopeLayout};
use crate::kernels::element_bytes;
use crate::EngineError;

/// A kernel, its grid (`None`: nothing to do) and its arguments.
pub(super) struct Launch {
    pub kernel: Kernel,
    pub config: Option<LaunchConfig>,
    pub args: Vec<Arg>,
}

/// `count` elements of `dtype` at `src` widened to f32 at `dst`.
pub(super) fn decode(src: u64, code: i64, dst: u64, count: usize) -> Launch {
    Launch {
        kernel: Kernel::Decode,
        config: elementwise(count),
        args: vec![Arg::Ptr(src), Arg::I64(code), Arg::Ptr(dst), n(count)],
    }
}

/// Rows `ids[..count]` (i64 on the device) of a `cols`-wide table into `out`.
pub(super) fn embed(table: u64, code: i64, ids: u64, count: usize, cols: usize, out: u64) -> Launch {
    Launch {
        kernel: Kernel::Embed,
        config: elementwise(count * cols),
        args: vec![Arg::Ptr(table), Arg::I64(code), Arg::Ptr(ids), n(count), n(cols), Arg::Ptr(out)],
    }
}

/// RMSNorm of `rows` rows `width` wide.
pub(super) fn rms_norm(
    x: u64,
    weight: u64,
    code: i64,
    width: usize,
    eps: f32,
    out: u64,
    rows: usize,
) -> Result<Launch, EngineError> {
    Ok(Launch {
        kernel: Kernel::RmsNorm,
        config: per_block(rows, NORM_THREADS)?,
        args: vec![Arg::Ptr(x), Arg::Ptr(weight), Arg::I64(code), n(width), Arg::F32(eps), Arg::Ptr(out)],
    })
}

/// The rotary tables the rope kernel reads: each row's position as f32 and the
/// frequencies `kernels::rope` takes (so the angles are bit-identical to the CPU's;
/// only sin and cos run on the GPU).
pub(super) fn rope_tables(positions: &[usize], frequencies: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (positions.iter().map(|&p| p as f32).collect(), frequencies.to_vec())
}

/// Rotary embedding of `rows` rows of `heads` heads in `layout`, tables from `rope_tables`.
pub(super) fn rope(
    x: u64,
    rows: usize,
    heads: usize,
    head_dim: usize,
    (positions, inv_freq): (u64, u64),
    layout: RopeLayout,
) -> Launch {
    let pairs = Arg::I64((layout == RopeLayout::Pairs) as i64);
    Launch {
        kernel: Kernel::Rope,
        config: elementwise(rows * heads * (head_dim / 2)),
        args: vec![Arg::Ptr(x), n(rows), n(heads), n(head_dim), Arg::Ptr(positions), Arg::Ptr(inv_freq), pairs],
    }
}

/// Attention of every sequence's `s.new` query rows over a KV block laid out as `layout`.
pub(super) fn attention(
    q: u64,
    cache: u64,
    layout: KvLayout,
    s: AttentionShape,
    out: u64,
) -> Result<Launch, EngineError> {
    Ok(Launch {
        kernel: Kernel::Attention,
        config: per_block(layout.sequences * s.new * s.heads, ATTN_THREADS)?,
        args: vec![
            Arg::Ptr(q),
            Arg::Ptr(cache),
            Arg::I64(dtype_code(layout.dtype)?),
            n(layout.sequences),
            n(layout.capacity),
            n(layout.row_bytes),
            n(s.past),
            n(s.new),
            n(s.heads),
            n(s.kv_heads),
            n(s.head_dim),
            Arg::Ptr(out),
        ],
    })
}

/// `new` f32 rows per sequence into positions `position ..` of half `half` of a KV block.
pub(super) fn store_kv(
    rows: u64,
    cache: u64,
    layout: KvLayout,
    half: usize,
    position: usize,
    new: usize,
) -> Result<Launch, EngineError> {
    let kv_dim = layout.row_bytes / element_bytes(layout.dtype);
    Ok(Launch {
        kernel: Kernel::StoreKv,
        config: elementwise(layout.sequences * new * kv_dim),
        args: vec![
            Arg::Ptr(rows),
            Arg::Ptr(cache),
            Arg::I64(dtype_code(layout.dtype)?),
            n(layout.sequences),
            n(layout.capacity),
            n(layout.row_bytes),
            n(half),
            n(position),
            n(new),
            n(kv_dim),
        ],
    })
}

/// `silu_mul` or `add` over `count` values.
pub(super) fn pairwise(kernel: Kernel, x: u64, other: u64, count: usize) -> Launch {
    Launch { kernel, config: elementwise(count), args: vec![Arg::Ptr(x), Arg::Ptr(other), n(count)] }
}

/// A `width`-long bias added at column `col0` of `rows` rows `stride` wide.
pub(super) fn add_bias(
    out: u64,
    bias: u64,
    code: i64,
    rows: usize,
    stride: usize,
    col0: usize,
    width: usize,
) -> Launch {
    Launch {
        kernel: Kernel::AddBias,
        config: elementwise(rows * width),
        args: vec![Arg::Ptr(out), Arg::Ptr(bias), Arg::I64(code), n(rows), n(stride), n(col0), n(width)],
    }
}

/// Rows `list[..count]` (i64 on the device) of `x` into `out`.
pub(super) fn gather_rows(x: u64, width: usize, list: u64, count: usize, out: u64) -> Launch {
    Launch {
        kernel: Kernel::GatherRows,
        config: elementwise(count * width),
        args: vec![Arg::Ptr(x), n(width), Arg::Ptr(list), n(count), Arg::Ptr(out)],
    }
}

/// Row `list[i]` of `out` += `scales[i]` × row i of `y`, for `count` distinct rows `width` wide.
pub(super) fn add_scaled_rows(out: u64, width: usize, list: u64, scales: u64, count: usize, y: u64) -> Launch {
    Launch {
        kernel: Kernel::AddScaledRows,
        config: elementwise(count * width),
        args: vec![Arg::Ptr(out), n(width), Arg::Ptr(list), Arg::Ptr(scales), n(count), Arg::Ptr(y)],
    }
}

/// Sets the u32 at `found` to 1 if rows `list[..count]` of `x` hold a NaN or infinity.
pub(super) fn rows_finite(x: u64, width: usize, list: u64, count: usize, found: u64) -> Launch {
    Launch {
        kernel: Kernel::RowsFinite,
        config: elementwise(count * width),
        args: vec![Arg::Ptr(x), n(width), Arg::Ptr(list), n(count), Arg::Ptr(found)],
    }
}
