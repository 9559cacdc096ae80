//! The model arithmetic against published figures and its own invariants.

use super::*;
use crate::catalog::Catalog;

fn model(name: &str) -> ModelSpec {
    Catalog::builtin().unwrap().model(name).unwrap().value
}

#[test]
fn parameter_counts_match_published_figures() {
    // (model, published billions, tolerance): OPT's positional-embedding count varies by source.
    let cases = [
        ("llama-2-7b", 6.74, 0.005),
        ("llama-2-13b", 13.02, 0.005),
        ("llama-2-70b", 68.98, 0.005),
        ("llama-3.1-8b", 8.03, 0.005),
        ("mistral-7b", 7.24, 0.005),
        ("mixtral-8x7b", 46.70, 0.005),
        ("opt-30b", 29.97, 0.01),
        ("opt-175b", 174.6, 0.01),
        ("qwen2.5-14b", 14.77, 0.005),
        ("qwen3-30b-a3b", 30.5, 0.005),
        ("qwen3-235b-a22b", 235.0, 0.005),
        ("tinyllama-1.1b", 1.10, 0.005),
    ];
    for (name, billions, tolerance) in cases {
        let total = model(name).params().total as f64 / 1e9;
        let error = (total - billions).abs() / billions;
        assert!(error <= tolerance, "{name}: {total:.3} B vs published {billions} B");
    }
}

#[test]
fn test_shapes_have_the_promised_sizes() {
    let tiny = model("test-tiny").total_bytes(Dtype::Bf16);
    assert!(tiny < 8_000_000, "test-tiny is {tiny} bytes");
    let small = model("test-small").total_bytes(Dtype::Bf16);
    assert!((150_000_000..=300_000_000).contains(&small), "test-small is {small} bytes");
    let tiny_moe = model("test-tiny-moe").total_bytes(Dtype::F32);
    assert!(tiny_moe < 8_000_000, "test-tiny-moe is {tiny_moe} bytes");
    let moe = model("test-moe");
    assert!((400_000_000..=800_000_000).contains(&moe.total_bytes(Dtype::Bf16)), "test-moe");
    assert!(moe.active_params() * 3 < moe.params().total, "test-moe's experts dominate");
}

#[test]
fn group_bytes_add_up_to_the_total() {
    for name in ["llama-2-13b", "mixtral-8x7b", "opt-13b", "qwen2.5-14b"] {
        let m = model(name);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Int8] {
            assert_eq!(m.total_bytes(dtype), dtype.bytes_of(m.params().total), "{name}");
        }
    }
}

#[test]
fn group_tensors_add_up_to_the_parameter_counts() {
    for name in [
        "llama-2-7b",
        "llama-2-70b",
        "mixtral-8x7b",
        "qwen2.5-14b",
        "qwen3-30b-a3b",
        "opt-13b",
        "test-tiny",
        "test-moe",
    ] {
        let m = model(name);
        let p = m.params();
        let sum = |g| m.group_tensors(g, 0).iter().map(TensorSpec::elements).sum::<u64>();
        // The per-layer groups hold every tensor of a layer, each once.
        assert_eq!(
            WeightGroup::PER_LAYER.into_iter().map(sum).sum::<u64>(),
            p.attention_per_layer + p.mlp_per_layer + p.norms_per_layer,
            "{name}"
        );
        let mut names: Vec<String> =
            WeightGroup::PER_LAYER.into_iter().flat_map(|g| m.group_tensors(g, 0)).map(|t| t.name).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "{name}: a tensor in two groups");
        assert_eq!(sum(WeightGroup::Embeddings), p.embeddings, "{name}");
        assert_eq!(sum(WeightGroup::Head), p.head, "{name}");
    }
}

#[test]
fn per_layer_groups_know_their_slots() {
    for (slot, group) in WeightGroup::PER_LAYER.into_iter().enumerate() {
        assert_eq!(group.layer_slot(), Some(slot));
    }
    assert_eq!(WeightGroup::Embeddings.layer_slot(), None);
    assert_eq!(WeightGroup::Head.layer_slot(), None);
}

#[test]
fn experts_touched_follow_uniform_routing() {
    let m = model("mixtral-8x7b");
    // One token touches exactly its k experts; many touch all; in between E(1 - (1 - k/E)^t).
    assert!((m.expected_experts(1) - 2.0).abs() < 1e-12);
    assert!((m.expected_experts(2) - 8.0 * (1.0 - 0.75f64 * 0.75)).abs() < 1e-12);
    assert!(m.expected_experts(1000) > 7.999 && m.expected_experts(1000) <= 8.0);
    let all = m.group_bytes(WeightGroup::Mlp, Dtype::F16);
    // One token reads the norm, the router and its 2 of 8 experts.
    let norm_and_router = m.hidden_size + m.hidden_size * m.num_experts;
    assert_eq!(m.mlp_bytes_read(1, all), Dtype::F16.bytes_of(norm_and_router + 2 * m.expert_params()));
    // A shared expert is read by every step, whatever the routing.
    let q = model("qwen1.5-moe-a2.7b");
    let all = q.group_bytes(WeightGroup::Mlp, Dtype::Bf16);
    let always = q.hidden_size + q.hidden_size * q.num_experts + q.shared_expert_params();
    assert_eq!(q.mlp_bytes_read(1, all), Dtype::Bf16.bytes_of(always + 4 * q.expert_params()));
    assert!(q.mlp_bytes_read(1, all) as f64 > 1.9 * Dtype::Bf16.bytes_of(4 * q.expert_params()) as f64);
    assert_eq!(model("test-tiny").mlp_bytes_read(5, 1234), 1234);
    // Mixtral 8x7B: 46.7 B parameters, 12.9 B active per token (Mistral AI's figures).
    let active = m.active_params() as f64 / 1e9;
    assert!((active - 12.9).abs() < 0.05, "{active}");
    // Qwen3's model cards: 3.3 B and 22 B activated.
    for (name, billions) in [("qwen3-30b-a3b", 3.3), ("qwen3-235b-a22b", 22.0)] {
        let active = model(name).active_params() as f64 / 1e9;
        assert!((active - billions).abs() / billions < 0.02, "{name}: {active}");
    }
    assert_eq!(model("test-tiny").active_params(), model("test-tiny").params().total);
}

#[test]
fn kv_cache_is_grouped_query_aware() {
    // Llama-2-70B: 8 KV heads of 128 → 2 × 1024 values per token per layer.
    assert_eq!(model("llama-2-70b").kv_bytes_per_token_per_layer(Dtype::F16), 4096);
    // Llama-2-13B: full multi-head attention, 2 × 5120.
    assert_eq!(model("llama-2-13b").kv_bytes_per_token_per_layer(Dtype::F16), 20480);
}

#[test]
fn attention_flops_count_causal_keys() {
    let m = model("test-tiny");
    // One decode token at context 10 sees 10 keys.
    assert_eq!(m.attention_core_flops(1, 10), 4 * m.hidden_size * 10);
    // A 3-token prompt sees 1 + 2 + 3 keys.
    assert_eq!(m.attention_core_flops(3, 3), 4 * m.hidden_size * 6);
}

#[test]
fn invalid_shapes_are_rejected() {
    let mut m = model("test-tiny");
    m.num_kv_heads = 3;
    assert!(m.validate().unwrap_err().to_string().contains("num_kv_heads"));
}

#[test]
fn huge_catalog_shapes_are_refused_not_overflowed() {
    let mut m = model("test-tiny");
    m.hidden_size = 1 << 62;
    m.num_heads = 1;
    m.num_kv_heads = 1;
    assert!(m.validate().unwrap_err().to_string().contains("implausibly large"));
    let mut m = model("test-tiny");
    m.rope_theta = f64::NAN;
    assert!(m.validate().unwrap_err().to_string().contains("rope_theta"));
}

#[test]
fn a_layer_of_experts_splits_into_its_router_part_and_experts_in_any_format() {
    for name in ["test-moe", "qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"] {
        let m = model(name);
        for format in [WeightFormat::F16, WeightFormat::parse("q4_k").unwrap()] {
            let layout = WeightLayout::of(&m, &WeightFormats::uniform(format));
            let sizes = layout.expert_bytes(&m, 0).unwrap();
            assert_eq!(sizes.experts.len() as u64, m.num_experts);
            // The same bytes as the group's tensors, as `group_tensors` lists them.
            assert_eq!(sizes.router + sizes.experts.iter().sum::<u64>(), layout.bytes(WeightGroup::Mlp, 0), "{name}");
            let tensors = m.group_tensors(WeightGroup::Mlp, 0);
            let router: u64 =
                tensors[m.router_tensors()].iter().map(|t| format.for_tensor(t, m.dtype).bytes(t.rows, t.cols)).sum();
            assert_eq!(sizes.router, router, "{name}");
            assert_eq!(sizes.most(m.experts_per_token), m.experts_per_token * sizes.experts[0]);
            assert_eq!(sizes.most(10 * m.num_experts), sizes.experts.iter().sum::<u64>());
            assert_eq!(sizes.expected(m.expected_experts(1)), m.experts_per_token * sizes.experts[0]);
            assert!(sizes.largest_tensor * 3 >= sizes.experts[0] && sizes.largest_tensor < sizes.experts[0]);
        }
    }
    assert!(WeightLayout::of(&model("test-tiny"), &WeightFormats::uniform(WeightFormat::F16))
        .expert_bytes(&model("test-tiny"), 0)
        .is_none());
}

#[test]
fn group_shapes_are_layer_zeros_tensors_with_the_same_quantizable_ones() {
    for name in
        ["test-tiny", "opt-6.7b", "qwen2.5-14b", "test-moe", "qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"]
    {
        let m = model(name);
        for group in [WeightGroup::Attention, WeightGroup::Mlp, WeightGroup::Embeddings, WeightGroup::Head] {
            let (named, shapes) = (m.group_tensors(group, 0), m.group_shapes(group));
            assert_eq!(named.len(), shapes.len(), "{name} {group:?}");
            for (t, s) in named.iter().zip(&shapes) {
                assert_eq!((t.rows, t.cols, t.quantizable()), (s.rows, s.cols, s.quantizable()), "{name} {}", t.name);
            }
        }
    }
}

#[test]
fn hot_experts_are_the_most_popular_and_take_their_share_of_the_routing() {
    let mut m = model("test-tiny-moe");
    let (e, k) = (m.num_experts as f64, m.experts_per_token as f64);
    // Uniform routing: the first ones, any are alike; they serve hot/E of the choices.
    assert_eq!(m.hot_experts(0, 3), vec![0, 1, 2]);
    assert_eq!(m.expected_cold_experts(5, 0), m.expected_experts(5));
    let uniform = (e - 3.0) * (1.0 - (1.0 - k / e).powi(5));
    assert!((m.expected_cold_experts(5, 3) - uniform).abs() < 1e-12);
    assert!((m.hot_hit_rate(3) - 3.0 / e).abs() < 1e-12);
    assert_eq!(m.expected_cold_experts(5, m.num_experts), 0.0);
    // A measured routing: each layer's most popular ones, ties to the lower expert.
    let layers = m.num_layers as usize;
    let mut shares = vec![vec![0.1, 0.1, 0.5, 0.1, 0.1, 0.9, 0.1, 0.1]; layers];
    shares[1] = vec![0.25; 8];
    m.routing = Some(std::sync::Arc::new(ExpertPopularity {
        model: m.name.clone(),
        experts_per_token: 2,
        tokens: 100,
        layers: shares.clone(),
    }));
    assert_eq!(m.hot_experts(0, 2), vec![2, 5]);
    assert_eq!(m.hot_experts(1, 2), vec![0, 1]);
    // Layer 0's two hot experts serve 1.4 of each token's 2 choices; layer 1's 0.5.
    let rate = (1.4 / 2.0 + 0.5 / 2.0 + (layers - 2) as f64 * 1.4 / 2.0) / layers as f64;
    assert!((m.hot_hit_rate(2) - rate).abs() < 1e-12, "{}", m.hot_hit_rate(2));
    // One token touches only the cold experts it picks: layer 0 six of 0.1 each.
    let layer0 = 6.0 * 0.1;
    let layer1 = 6.0 * 0.25;
    let cold = (layer0 + layer1 + (layers - 2) as f64 * layer0) / layers as f64;
    assert!((m.expected_cold_experts(1, 2) - cold).abs() < 1e-12);
}
