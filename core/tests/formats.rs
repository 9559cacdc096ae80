//! Weight formats as plan data: exact bytes per format against block arithmetic done by
//! hand, what each format applies to, pieces cut at whole blocks and groups, shapes a
//! format cannot store, and the YAML forms (old `weight_dtype` included).

use ferry_core::catalog::Catalog;
use ferry_core::model::{Dtype, ModelSpec, WeightFormat, WeightFormats, WeightGroup, WeightLayout};
use ferry_core::plan::Plan;
use ferry_core::schedule::{format_pieces, weight_pieces};

fn model(name: &str) -> ModelSpec {
    Catalog::builtin().unwrap().model(name).unwrap().value
}

fn layout(model: &ModelSpec, format: &str) -> WeightLayout {
    WeightLayout::of(model, &WeightFormats::uniform(WeightFormat::parse(format).unwrap()))
}

/// Llama-2-7B: hidden 4096, MLP 11008 (43 × 256), 32 heads (no GQA), vocabulary 32000.
/// Per layer: q, k, v, o are 4096 × 4096; gate and up 11008 × 4096; down 4096 × 11008;
/// the two norms 4096 values each, stored F32 by the ggml formats.
#[test]
fn bytes_per_group_follow_the_block_layouts_exactly() {
    let m = model("llama-2-7b");
    let norm_f32 = 4096 * 4;
    // (format, bytes of one 4096-wide row, bytes of one 11008-wide row): blocks per row × block bytes.
    let cases: [(&str, u64, u64); 4] = [
        ("q8_0", 4096 / 32 * 34, 11008 / 32 * 34),
        ("q4_0", 4096 / 32 * 18, 11008 / 32 * 18),
        ("q4_k", 4096 / 256 * 144, 11008 / 256 * 144),
        ("q6_k", 4096 / 256 * 210, 11008 / 256 * 210),
    ];
    for (format, row_4096, row_11008) in cases {
        let l = layout(&m, format);
        assert_eq!(l.bytes(WeightGroup::Attention, 7), norm_f32 + 4 * 4096 * row_4096, "{format} attention");
        assert_eq!(l.bytes(WeightGroup::Mlp, 7), norm_f32 + 2 * 11008 * row_4096 + 4096 * row_11008, "{format} mlp");
        assert_eq!(l.bytes(WeightGroup::Embeddings, 0), 32000 * row_4096, "{format} embeddings");
        assert_eq!(l.bytes(WeightGroup::Head, 0), norm_f32 + 32000 * row_4096, "{format} head");
    }
    // Q4_K by the numbers: 16 blocks of 144 bytes per 4096-wide row.
    assert_eq!(layout(&m, "q4_k").bytes(WeightGroup::Attention, 0), 16_384 + 4 * 4096 * 2304);
    // FlexGen's int4, groups of 64 down each column: 32 bytes of values + 4 of scale and
    // min per group; norms stay in the model's f16.
    let int4 = layout(&m, "int4-g64");
    assert_eq!(int4.bytes(WeightGroup::Attention, 0), 4096 * 2 + 4 * (4096 / 64) * 4096 * 36);
    let down = (4096 / 64) * 11008 * 36;
    assert_eq!(int4.bytes(WeightGroup::Mlp, 0), 4096 * 2 + 2 * (11008 / 64) * 4096 * 36 + down);
    // int8: a byte per value. A group size that does not divide the rows pads the last group.
    let int8 = layout(&m, "int8-g100");
    assert_eq!(int8.bytes(WeightGroup::Attention, 0), 4096 * 2 + 4 * 4096_u64.div_ceil(100) * 4096 * 104);
}

#[test]
fn float_formats_price_exactly_what_dtypes_did() {
    for name in ["llama-2-13b", "mixtral-8x7b", "opt-13b", "qwen2.5-14b", "tinyllama-1.1b"] {
        let m = model(name);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let l = WeightLayout::of(&m, &WeightFormats::float(dtype).unwrap());
            for group in [WeightGroup::Attention, WeightGroup::Mlp, WeightGroup::Embeddings, WeightGroup::Head] {
                assert_eq!(l.bytes(group, 3), m.group_bytes(group, dtype), "{name} {group:?} {dtype:?}");
            }
            assert_eq!(l.total_bytes(), m.total_bytes(dtype), "{name}");
        }
    }
}

#[test]
fn quantized_formats_leave_routers_and_position_embeddings_float() {
    // Mixtral's router (8 × 4096) stays in the model's bf16, as llama.cpp keeps ffn_gate_inp.
    let m = model("mixtral-8x7b");
    let l = layout(&m, "q8_0");
    let experts = 8 * 3 * 14336 * (4096 / 32 * 34);
    assert_eq!(l.bytes(WeightGroup::Mlp, 0), 4096 * 4 + 8 * 4096 * 2 + experts);
    // OPT's learned positions stay float under a ggml format; FlexGen compresses them.
    let opt = model("opt-13b");
    let positions = (opt.max_position_embeddings + 2) * opt.hidden_size;
    let tokens = opt.vocab_size * (opt.hidden_size / 32 * 34);
    assert_eq!(layout(&opt, "q8_0").bytes(WeightGroup::Embeddings, 0), tokens + positions * 2);
}

/// Rows a K-quant's 256-value blocks do not divide take llama.cpp's quantizer's
/// fallback (Q4_K → Q5_0, Q6_K → Q8_0), as Qwen1.5-MoE's 1408-wide experts do in its
/// Q4_K_M files; rows no 32-value block divides either are refused for the 32-value
/// formats, naming the tensor.
#[test]
fn rows_a_k_quant_cannot_store_take_llama_cpps_fallback() {
    // test-tiny's rows are 128 values: not whole blocks of 256.
    let m = model("test-tiny");
    for (asked, stored) in [("q4_k", "q5_0"), ("q6_k", "q8_0")] {
        WeightFormats::uniform(WeightFormat::parse(asked).unwrap()).check(&m).unwrap();
        for group in [WeightGroup::Attention, WeightGroup::Mlp, WeightGroup::Head] {
            assert_eq!(layout(&m, asked).bytes(group, 0), layout(&m, stored).bytes(group, 0), "{asked} {group:?}");
        }
    }
    // Qwen1.5-MoE: the experts' down projections (1408 values a row) in Q5_0, the rest Q4_K.
    let qwen = model("qwen1.5-moe-a2.7b");
    let l = layout(&qwen, "q4_k");
    let tensors = qwen.group_tensors(WeightGroup::Mlp, 0);
    let formats = &l.group(WeightGroup::Mlp, 0).tensors;
    for (t, f) in tensors.iter().zip(formats.iter()) {
        let want = if t.name.contains("experts.") && t.name.ends_with("down_proj.weight") { "q5_0" } else { "q4_k" };
        if t.rows > 1 && t.quantizable() {
            assert_eq!(f.name(), want, "{}", t.name);
        }
    }
    // Rows of 200 values: whole blocks of no quantized type. Q4_K falls back to F16 as
    // llama.cpp's does; Q4_0 cannot store them.
    let mut odd = model("test-tiny");
    odd.intermediate_size = 200;
    WeightFormats::uniform(WeightFormat::parse("q4_k").unwrap()).check(&odd).unwrap();
    let err = WeightFormats::uniform(WeightFormat::parse("q4_0").unwrap()).check(&odd).unwrap_err().to_string();
    assert!(err.contains("down_proj.weight") && err.contains("blocks of 32"), "{err}");
}

#[test]
fn pieces_cut_quantized_tensors_at_whole_rows_and_groups() {
    let m = model("llama-2-7b");
    for format in ["q4_k", "q6_k", "int4-g64", "f16"] {
        let l = layout(&m, format);
        let size = l.group(WeightGroup::Mlp, 2);
        let pieces = format_pieces(&m, WeightGroup::Mlp, size, 4 << 20);
        assert!(pieces.len() > 3, "{format}");
        assert_eq!(pieces.iter().map(|p| p.bytes).sum::<u64>(), size.bytes, "{format}: pieces add up");
        let tensors = m.group_tensors(WeightGroup::Mlp, 2);
        for p in &pieces {
            let t = &tensors[p.tensor as usize];
            let f = size.tensors[p.tensor as usize];
            // Every cut is between whole rows (whole blocks), and for groups between whole groups.
            assert!(p.row_start.is_multiple_of(f.row_unit()), "{format}: {p:?}");
            assert_eq!(p.bytes, f.bytes(p.rows, t.cols), "{format}: {p:?}");
        }
    }
    // Float formats cut exactly as the executor's float pieces do.
    let f16 = layout(&m, "f16");
    let pieces = format_pieces(&m, WeightGroup::Attention, f16.group(WeightGroup::Attention, 0), 1 << 20);
    assert_eq!(pieces, weight_pieces(&m, WeightGroup::Attention, Dtype::F16, 1 << 20));
}

/// A mixture of experts' hundreds of expert projections are packed into pieces of
/// about the target size (whole tensors, in order), so a pipelined transfer of a
/// Qwen3-30B-A3B layer is tens of tasks, not one per projection; dense groups are cut
/// as before.
#[test]
fn pieces_pack_an_mlp_s_small_expert_projections_whole() {
    let cases = [
        ("qwen3-30b-a3b", "q4_k", 256u64 << 20),
        ("test-moe", "f16", 4 << 20),
        ("qwen1.5-moe-a2.7b", "q8_0", 16 << 20),
    ];
    for (name, format, chunk) in cases {
        let m = model(name);
        let l = layout(&m, format);
        let size = l.group(WeightGroup::Mlp, 0);
        let pieces = format_pieces(&m, WeightGroup::Mlp, size, chunk);
        let tensors = m.group_tensors(WeightGroup::Mlp, 0);
        assert_eq!(pieces.iter().map(|p| p.bytes).sum::<u64>(), size.bytes, "{name}: pieces add up");
        let share = size.bytes.div_ceil(ferry_core::schedule::MAX_PIPELINE_PIECES);
        // Every tensor is covered once, in order; packed pieces hold whole expert tensors.
        let mut next = 0;
        for p in &pieces {
            let first = p.tensor as usize;
            if p.tensors > 1 {
                assert_eq!(first, next, "{name}: {p:?}");
                assert!(first >= m.router_tensors().end && p.bytes <= share, "{name}: {p:?}");
                let whole: u64 = (first..first + p.tensors as usize)
                    .map(|t| size.tensors[t].bytes(tensors[t].rows, tensors[t].cols))
                    .sum();
                assert_eq!(p.bytes, whole, "{name}: {p:?}");
                next = first + p.tensors as usize;
            } else {
                assert!(first == next || (first + 1 == next && p.row_start > 0), "{name}: {p:?}");
                assert_eq!(p.bytes, size.tensors[first].bytes(p.rows, tensors[first].cols), "{name}: {p:?}");
                next = first + 1;
            }
        }
        assert_eq!(next, tensors.len(), "{name}");
        assert!(pieces.iter().any(|p| p.tensors > 1), "{name}: nothing packed");
        // About the intended count, whatever the number of experts.
        let count = pieces.len() as u64;
        assert!(
            count <= 2 * ferry_core::schedule::MAX_PIPELINE_PIECES + m.router_tensors().end as u64 + 1,
            "{name}: {count} pieces"
        );
    }
    // Projections of a 16th of the group or more stay pieces of their own (Mixtral's).
    let m = model("mixtral-8x7b");
    let q4k = layout(&m, "q4_k");
    let pieces = format_pieces(&m, WeightGroup::Mlp, q4k.group(WeightGroup::Mlp, 0), 256 << 20);
    assert!(pieces.iter().all(|p| p.tensors == 1));
    assert_eq!(pieces.len(), m.group_tensors(WeightGroup::Mlp, 0).len());
    // A dense group keeps a piece per tensor at least.
    let m = model("llama-2-7b");
    let f16 = layout(&m, "f16");
    let pieces = format_pieces(&m, WeightGroup::Attention, f16.group(WeightGroup::Attention, 0), 1 << 30);
    assert_eq!(pieces.len(), m.group_tensors(WeightGroup::Attention, 0).len());
    assert!(pieces.iter().all(|p| p.tensors == 1));
}

const POLICY: &str = "model: 13b
hardware: {gpu: rtx3060}
workload: {batch_size: 1, prompt_len: 8, gen_len: 4}
policy:
  schedule: sequential
  micro_batch_size: 1
  num_micro_batches: 1
  prefetch_depth: 0
  attention_weights: {device: 40, host: 0, disk: 0}
  mlp_weights: {device: 40, host: 0, disk: 0}
  embeddings: device
  head: device
  kv_cache: {device: 40, host: 0, disk: 0}
  host_attention: false
  kv_dtype: f16
  chunk_bytes: 4MiB
  copy_streams: 1
  io_queue_depth: 1
  pinned_host_bytes: 0B
";

fn plan(format_line: &str) -> Result<Plan, String> {
    ferry_core::yaml::from_yaml_str(&format!("{POLICY}  {format_line}\n"), "plan.yaml").map_err(|e| e.to_string())
}

#[test]
fn plans_say_their_format_in_the_short_and_the_long_form() {
    let old = plan("weight_dtype: f16").unwrap();
    let new = plan("weight_format: f16").unwrap();
    assert_eq!(old, new, "weight_dtype is the old name of a float weight_format");
    assert_eq!(new.policy.weight_dtype, Dtype::F16);
    let short = plan("weight_format: q4_k").unwrap();
    assert_eq!(short.policy.weight_format, WeightFormats::uniform(WeightFormat::parse("q4_k").unwrap()));
    let long = plan("weight_format: {default: q4_k, head: q6_k, mlp: int4-g128}").unwrap();
    let formats = &long.policy.weight_format;
    assert_eq!(formats.group(WeightGroup::Head).map(WeightFormat::name).as_deref(), Some("q6_k"));
    assert_eq!(formats.group(WeightGroup::Mlp).map(WeightFormat::name).as_deref(), Some("int4-g128"));
    assert_eq!(formats.group(WeightGroup::Attention).map(WeightFormat::name).as_deref(), Some("q4_k"));
    // Written back, each reads the same; the old name is never written.
    for p in [&new, &short, &long] {
        let text = ferry_core::yaml::to_yaml_string(p).unwrap();
        assert!(text.contains("weight_format:") && !text.contains("weight_dtype"), "{text}");
        assert_eq!(&ferry_core::yaml::from_yaml_str::<Plan>(&text, "again.yaml").unwrap(), p);
    }
    assert_eq!(plan("weight_format: stored").unwrap().policy.weight_format, WeightFormats::stored());
}

#[test]
fn malformed_formats_are_refused_saying_what_to_write() {
    let cases = [
        ("weight_format: q4k", "did you mean: q4_k"),
        ("weight_format: {default: q4_k, hed: q6_k}", "unknown weight_format key `hed`"),
        ("weight_format: {head: q6_k}", "needs `default`"),
        ("weight_format: int4-g7", "even number"),
        ("weight_dtype: int4", "no storage format"),
        ("weight_dtype: f16\n  weight_format: f16", "not both"),
    ];
    for (line, expected) in cases {
        let err = plan(line).unwrap_err();
        assert!(err.contains(expected) && err.contains("plan.yaml:"), "{line}: {err}");
    }
    let err = plan("").unwrap_err();
    assert!(err.contains("weight_format"), "{err}");
}

/// Against a file people download: TheBloke/Llama-2-7B-GGUF lists `llama-2-7b.Q8_0.gguf`
/// at 7.16 GB (every matrix Q8_0, norms F32; the header with the vocabulary adds under
/// a megabyte).
#[test]
fn a_q8_0_llama_2_7b_weighs_what_the_published_file_does() {
    let total = layout(&model("llama-2-7b"), "q8_0").total_bytes();
    assert_eq!(total, 7_160_348_672);
    assert!((total as f64 - 7.16e9).abs() / 7.16e9 < 0.001, "{total}");
}

/// A profile's kernel table prices a quantized format's tasks only where its entries
/// timed that format; the note says which formats it did not.
#[test]
fn the_kernel_table_note_names_only_the_formats_the_table_did_not_time() {
    use ferry_core::profile::{KernelTiming, Profile};
    let catalog = Catalog::builtin().unwrap();
    let hardware = ferry_core::hardware::Hardware {
        gpu: catalog.gpu("cpu").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    };
    let m = model("tinyllama-1.1b");
    let timing = |format: Option<&str>| KernelTiming {
        op: "mlp".into(),
        shape: "2048x5632".into(),
        tokens: 1,
        context: 0,
        ns: 1_000_000,
        format: format.map(str::to_string),
    };
    let note = |table: Vec<KernelTiming>, format: &str| -> Vec<String> {
        let mut profile = Profile::from_datasheet(&hardware);
        profile.device_compute.table = table;
        let formats = WeightFormats::uniform(WeightFormat::parse(format).unwrap());
        ferry_core::resolve::weight_format_notes(&formats, &m, &profile)
            .into_iter()
            .filter(|n| n.contains("kernel table"))
            .collect()
    };
    assert!(note(vec![timing(Some("q4_0"))], "q4_0").is_empty());
    let float_table = note(vec![timing(None)], "q4_0");
    assert!(float_table.len() == 1 && float_table[0].contains("did not time q4_0"), "{float_table:?}");
    assert_eq!(note(vec![timing(Some("q4_0"))], "q8_0").len(), 1);
    assert!(note(Vec::new(), "q4_0").is_empty(), "no table, nothing to say about one");
}
