//! `ferry list` and `ferry show`: the catalog for people.

use anyhow::Result;
use clap::{Args, ValueEnum};
use ferry_core::catalog::Catalog;
use ferry_core::model::{Dtype, WeightFormat, WeightFormats, WeightGroup, WeightLayout};
use ferry_core::units::format_bytes;

use crate::table::Table;

#[derive(Clone, Copy, ValueEnum)]
pub enum ListWhat {
    Gpus,
    Models,
    Hosts,
    Disks,
    /// Machines of several devices and clusters of machines (`ferry tune --cluster`).
    Clusters,
    /// Link presets joining devices or machines (`ferry tune --gpu a,b --link`).
    Links,
}

#[derive(Args)]
pub struct ListArgs {
    /// What to list.
    what: ListWhat,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ShowWhat {
    Model,
    Gpu,
    Host,
    /// The datasheet profile of a GPU in its usual host, as YAML: a template for `--profile`.
    Profile,
}

#[derive(Args)]
pub struct ShowArgs {
    /// What kind of entry.
    what: ShowWhat,
    /// A catalog name or alias (e.g. 13b, rtx3060); for models also a Hugging Face
    /// folder or its config.json.
    name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn list(args: ListArgs) -> Result<()> {
    let catalog = Catalog::builtin()?;
    match args.what {
        ListWhat::Gpus => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.gpus)?);
                return Ok(());
            }
            let mut table =
                Table::new(["name", "memory", "fp16 TFLOP/s", "fp32 TFLOP/s", "mem GB/s", "link", "aliases"]);
            for gpu in &catalog.gpus {
                table.row([
                    gpu.name.clone(),
                    format_bytes(gpu.memory_bytes),
                    format!("{:.1}", gpu.fp16_tflops),
                    format!("{:.1}", gpu.fp32_tflops),
                    format!("{:.0}", gpu.memory_bandwidth_gbps),
                    gpu.interconnect.describe(),
                    Catalog::aliases_of(&catalog.gpu_aliases, &gpu.name).join(", "),
                ]);
            }
            print!("{}", table.render());
            println!("\nfp16 is dense tensor throughput with fp32 accumulate; `cpu` is the CPU backend (memory = --device-mem budget).");
        }
        ListWhat::Models => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.models)?);
                return Ok(());
            }
            let mut table =
                Table::new(["name", "family", "params", "layers", "hidden", "kv heads", "fp16 size", "aliases"]);
            for model in &catalog.models {
                table.row([
                    model.name.clone(),
                    format!("{:?}", model.family).to_lowercase(),
                    format_params(model.params().total),
                    model.num_layers.to_string(),
                    model.hidden_size.to_string(),
                    format!("{}/{}", model.num_kv_heads, model.num_heads),
                    format_bytes(model.total_bytes(Dtype::F16)),
                    Catalog::aliases_of(&catalog.model_aliases, &model.name).join(", "),
                ]);
            }
            print!("{}", table.render());
        }
        ListWhat::Clusters => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.clusters)?);
                return Ok(());
            }
            let mut table = Table::new(["name", "devices", "links", "description"]);
            for cluster in &catalog.clusters {
                let devices: Vec<String> = cluster
                    .nodes
                    .iter()
                    .map(|n| {
                        let list: Vec<String> = n.devices.iter().map(|d| format!("{}×{}", d.count, d.gpu)).collect();
                        format!("{} in {}", list.join("+"), n.host)
                    })
                    .collect();
                let links: Vec<&str> = cluster.peer_link.iter().chain(&cluster.node_link).map(String::as_str).collect();
                let links = if links.is_empty() { "through the host".to_string() } else { links.join(", ") };
                table.row([cluster.name.clone(), devices.join("; "), links, cluster.description.clone()]);
            }
            print!("{}", table.render());
        }
        ListWhat::Links => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.links)?);
                return Ok(());
            }
            let mut table = Table::new(["name", "kind", "GB/s (achieved)", "latency", "description"]);
            for link in &catalog.links {
                table.row([
                    link.name.clone(),
                    format!("{:?}", link.kind).to_lowercase(),
                    format!("{:.3}", link.peak_gbps * link.efficiency),
                    format!("{} µs", link.latency_us),
                    link.description.clone(),
                ]);
            }
            print!("{}", table.render());
        }
        ListWhat::Disks => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.disks)?);
                return Ok(());
            }
            let mut table = Table::new(["name", "read GB/s", "write GB/s", "latency", "capacity", "description"]);
            for disk in &catalog.disks {
                table.row([
                    disk.name.clone(),
                    format!("{:.2}", disk.read_gbps),
                    format!("{:.2}", disk.write_gbps),
                    format!("{} µs", disk.latency_us),
                    format_bytes(disk.capacity_bytes),
                    disk.description.clone(),
                ]);
            }
            print!("{}", table.render());
        }
        ListWhat::Hosts => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&catalog.hosts)?);
                return Ok(());
            }
            let mut table = Table::new([
                "name",
                "RAM",
                "disk read GB/s",
                "disk write GB/s",
                "memcpy GB/s",
                "CPU GFLOP/s",
                "description",
            ]);
            for host in &catalog.hosts {
                table.row([
                    host.name.clone(),
                    format_bytes(host.ram_bytes),
                    format!("{:.2}", host.disk_read_gbps),
                    format!("{:.2}", host.disk_write_gbps),
                    format!("{:.0}", host.memcpy_gbps),
                    format!("{:.0}", host.cpu_gflops),
                    host.description.clone(),
                ]);
            }
            print!("{}", table.render());
        }
    }
    Ok(())
}

pub fn show(args: ShowArgs) -> Result<()> {
    let catalog = Catalog::builtin()?;
    match args.what {
        ShowWhat::Model if args.name.ends_with(".gguf") && std::path::Path::new(&args.name).is_file() => {
            show_gguf(std::path::Path::new(&args.name), args.json)?;
        }
        ShowWhat::Model => {
            let resolved = catalog.model(&args.name)?;
            if let Some(note) = &resolved.note {
                eprintln!("note: {note}");
            }
            let model = resolved.value;
            if args.json {
                let breakdown = serde_json::json!({
                    "model": model,
                    "params": model.params(),
                    "active_params": model.active_params(),
                    "expert_params": model.expert_params(),
                    "kv_bytes_per_token_fp16": model.kv_bytes_per_token_per_layer(Dtype::F16) * model.num_layers,
                });
                println!("{}", serde_json::to_string_pretty(&breakdown)?);
                return Ok(());
            }
            let params = model.params();
            println!("{} ({:?}), {} parameters", model.name, model.family, format_params(params.total));
            println!("{}", shape_line(&model));
            println!("source: {}\n", model.source);
            // Bytes in the formats plans use (`weight_format`), exact to their block layouts;
            // "—" where a format cannot store the shape.
            let formats = ["f32", "f16", "q8_0", "q6_k", "q4_k", "int4-g64"];
            let layouts: Vec<Option<WeightLayout>> = formats
                .iter()
                .map(|name| {
                    let formats = WeightFormats::uniform(WeightFormat::parse(name).ok()?);
                    formats.check(&model).ok()?;
                    Some(WeightLayout::of(&model, &formats))
                })
                .collect();
            let mut table = Table::new(["weights", "params", "f32", "f16/bf16", "q8_0", "q6_k", "q4_k", "int4-g64"]);
            let add = |table: &mut Table, label: String, count: u64, bytes: &dyn Fn(&WeightLayout) -> u64| {
                let mut row = vec![label, format_params(count)];
                row.extend(layouts.iter().map(|l| l.as_ref().map_or("—".into(), |l| format_bytes(bytes(l)))));
                table.row(row);
            };
            let half = params.norms_per_layer / 2;
            let per_layer = params.attention_per_layer + params.mlp_per_layer + params.norms_per_layer;
            add(&mut table, "attention, per layer".into(), params.attention_per_layer + half, &|l| {
                l.bytes(WeightGroup::Attention, 0)
            });
            add(&mut table, "MLP, per layer".into(), params.mlp_per_layer + params.norms_per_layer - half, &|l| {
                l.bytes(WeightGroup::Mlp, 0)
            });
            add(&mut table, "one layer".into(), per_layer, &|l| {
                l.bytes(WeightGroup::Attention, 0) + l.bytes(WeightGroup::Mlp, 0)
            });
            add(&mut table, format!("all {} layers", model.num_layers), model.num_layers * per_layer, &|l| {
                l.group_total(WeightGroup::Attention) + l.group_total(WeightGroup::Mlp)
            });
            if model.num_experts > 0 {
                // One expert's gate, up and down projections, each in the type the layout
                // gives it (a K-quant's fallback where its blocks do not divide the rows).
                let mlp = model.group_tensors(WeightGroup::Mlp, 0);
                let expert = mlp.get(model.expert_tensors(0)).unwrap_or_default();
                add(&mut table, "one expert".into(), model.expert_params(), &|l| {
                    let formats = l.group(WeightGroup::Mlp, 0).tensors.get(model.expert_tensors(0)).unwrap_or_default();
                    expert.iter().zip(formats).map(|(t, f)| f.bytes(t.rows, t.cols)).sum()
                });
            }
            add(&mut table, "embeddings".into(), params.embeddings, &|l| l.bytes(WeightGroup::Embeddings, 0));
            add(&mut table, "final norm + head".into(), params.head, &|l| l.bytes(WeightGroup::Head, 0));
            add(&mut table, "total".into(), params.total, &|l| l.total_bytes());
            print!("{}", table.render());
            for name in formats {
                let Ok(format) = WeightFormat::parse(name) else { continue };
                for note in WeightFormats::uniform(format).fallbacks(&model) {
                    println!("{note}");
                }
            }
            if model.num_experts > 0 {
                println!(
                    "\nactive per token: {} of {} parameters ({} of {} experts per layer); a batch of 8 tokens \
                     touches {:.1} experts per layer on average under uniform routing",
                    format_params(model.active_params()),
                    format_params(params.total),
                    model.experts_per_token,
                    model.num_experts,
                    model.expected_experts(8)
                );
            }
            let kv16 = model.kv_bytes_per_token_per_layer(Dtype::F16);
            println!(
                "\nKV cache (fp16): {} per token per layer, {} per token for all layers; {} for one 4096-token sequence",
                format_bytes(kv16),
                format_bytes(kv16 * model.num_layers),
                format_bytes(kv16 * model.num_layers * 4096)
            );
            println!(
                "activations (f32): {} per token between layers, {} per token of workspace inside a layer",
                format_bytes(model.activation_bytes_per_token()),
                format_bytes(model.workspace_bytes_per_token())
            );
        }
        ShowWhat::Gpu => {
            let resolved = catalog.gpu(&args.name)?;
            if let Some(note) = &resolved.note {
                eprintln!("note: {note}");
            }
            let gpu = resolved.value;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&gpu)?);
                return Ok(());
            }
            println!("{}: {}", gpu.name, gpu.description);
            let mut table = Table::new(["figure", "value"]);
            table.row(["memory".to_string(), format_bytes(gpu.memory_bytes)]);
            table.row(["fp16/bf16 tensor (dense)".to_string(), format!("{} TFLOP/s", gpu.fp16_tflops)]);
            if let Some(sustained) = &gpu.sustained {
                table.row([
                    "fp16 products, sustained (measured)".to_string(),
                    format!("{} TFLOP/s", sustained.fp16_gemm_tflops),
                ]);
            }
            table.row(["fp32".to_string(), format!("{} TFLOP/s", gpu.fp32_tflops)]);
            table.row(["memory bandwidth".to_string(), format!("{} GB/s", gpu.memory_bandwidth_gbps)]);
            let link = match gpu.interconnect.peak_gbps() {
                Some(peak) => format!("{} ({peak:.1} GB/s per direction, theoretical)", gpu.interconnect.describe()),
                None => gpu.interconnect.describe(),
            };
            table.row(["host link".to_string(), link]);
            table.row(["default host preset".to_string(), gpu.default_host.clone()]);
            print!("{}", table.render());
            println!("source: {}", gpu.source);
            if let Some(sustained) = &gpu.sustained {
                println!("sustained figures: {}", sustained.source);
            }
        }
        ShowWhat::Profile => {
            let gpu = catalog.gpu(&args.name)?;
            if let Some(note) = &gpu.note {
                eprintln!("note: {note}");
            }
            let host = catalog.host(&gpu.value.default_host)?.value;
            let profile =
                ferry_core::profile::Profile::from_datasheet(&ferry_core::hardware::Hardware { gpu: gpu.value, host });
            if args.json {
                println!("{}", serde_json::to_string_pretty(&profile)?);
            } else {
                println!("# Datasheet profile: edit the figures you have measured and pass the file with --profile.");
                print!("{}", ferry_core::yaml::to_yaml_string(&profile)?);
            }
        }
        ShowWhat::Host => {
            let resolved = catalog.host(&args.name)?;
            if let Some(note) = &resolved.note {
                eprintln!("note: {note}");
            }
            let host = resolved.value;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&host)?);
                return Ok(());
            }
            println!("{}", ferry_core::yaml::to_yaml_string(&host)?);
        }
    }
    Ok(())
}

/// 13015864320 → "13.02 B".
pub fn format_params(count: u64) -> String {
    let value = count as f64;
    if value >= 1e9 {
        format!("{:.2} B", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else {
        format!("{count}")
    }
}

/// A GGUF file: the shape its metadata describes and its bytes per weight group by the
/// tensor types it really holds.
fn show_gguf(path: &std::path::Path, json: bool) -> Result<()> {
    use ferry_core::gguf::GgufHeader;
    use ferry_core::model::{from_gguf, GroupBytes};
    let header = GgufHeader::open(path)?;
    let name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let model = from_gguf(&header, &name)?;
    let bytes = GroupBytes::of(&header);
    let file_bytes: u64 = header.tensors.iter().map(|t| t.end - t.start).sum();
    if json {
        let groups: serde_json::Map<String, serde_json::Value> = bytes
            .groups
            .iter()
            .map(|(group, (total, types))| {
                (group.name().to_lowercase(), serde_json::json!({ "bytes": total, "by_type": types }))
            })
            .collect();
        let out = serde_json::json!({
            "model": model,
            "params": model.params(),
            "file": { "gguf_version": header.version, "tensors": header.tensors.len(),
                      "tensor_bytes": file_bytes, "groups": groups, "other_tensors": bytes.other },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let params = model.params();
    println!(
        "{} ({:?}), {} parameters; GGUF v{}, {} tensors",
        model.name,
        model.family,
        format_params(params.total),
        header.version,
        header.tensors.len()
    );
    println!("{}, {} positions", shape_line(&model), model.max_position_embeddings);
    println!("source: {}\n", path.display());
    let mut table = Table::new(["weights in this file", "bytes", "per layer", "tensor types (share of bytes)"]);
    for (group, (total, types)) in &bytes.groups {
        let per_layer =
            if group.layer_slot().is_some() { format_bytes(total / model.num_layers.max(1)) } else { String::new() };
        let mix: Vec<String> = types
            .iter()
            .map(|(name, b)| format!("{name} {:.0} %", 100.0 * *b as f64 / (*total).max(1) as f64))
            .collect();
        let label = match group {
            WeightGroup::Head => "final norm + head".to_string(),
            g if g.layer_slot().is_some() => format!("{}, all {} layers", g.name(), model.num_layers),
            g => g.name().to_string(),
        };
        table.row([label, format_bytes(*total), per_layer, mix.join(", ")]);
    }
    if !bytes.other.is_empty() {
        table.row([format!("other ({} tensors)", bytes.other.len()), String::new(), String::new(), String::new()]);
    }
    table.row(["total".to_string(), format_bytes(file_bytes), String::new(), String::new()]);
    print!("{}", table.render());
    let kv16 = model.kv_bytes_per_token_per_layer(Dtype::F16);
    println!(
        "\nKV cache (fp16): {} per token per layer, {} per token for all layers",
        format_bytes(kv16),
        format_bytes(kv16 * model.num_layers)
    );
    if ferry_core::model::float_dtype(&header).is_none() {
        println!(
            "`ferry tune` and `ferry simulate` plan this file as stored (weight_format: stored, these bytes); \
             `ferry run` multiplies from its blocks (with 8-bit activations, as llama.cpp; \
             `--activations f32` to keep them exact)"
        );
    }
    Ok(())
}

/// "22 layers, hidden 2048, MLP 5632, 32 heads (4 KV heads), vocabulary 32000[, experts]".
fn shape_line(model: &ferry_core::model::ModelSpec) -> String {
    let experts = if model.num_experts > 0 {
        let weights = if model.renormalize_top_k { "" } else { ", weights not renormalised" };
        let shared = match model.shared_expert_intermediate_size {
            0 => String::new(),
            width => format!(" and a shared expert of width {width}"),
        };
        format!(", {} experts ({} per token{weights}){shared}", model.num_experts, model.experts_per_token)
    } else {
        String::new()
    };
    format!(
        "{} layers, hidden {}, MLP {}, {} heads ({} KV heads), vocabulary {}{experts}",
        model.num_layers,
        model.hidden_size,
        model.intermediate_size,
        model.num_heads,
        model.num_kv_heads,
        model.vocab_size
    )
}
