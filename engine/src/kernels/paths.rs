//! Which kernels this process multiplies with, as a cpu profile's provenance names
//! them, and a note when a profile names others: its kernel table then timed other
//! code than the run will execute (another machine, or `FERRY_SIMD`, `FERRY_AMX`,
//! `FERRY_BF16_PAIRS`, `FERRY_VNNI` or `FERRY_BLOCK_ORDER` set otherwise).

use super::{byte_products_path, few_rows_path, matrix_path, resident_order, simd_path, BlockOrder};

/// Each choice as (what it is, the text before its value, the text after it, this
/// process's value), in the order `description` writes them.
fn choices() -> [(&'static str, &'static str, &'static str, &'static str); 5] {
    let order = match resident_order() {
        BlockOrder::Rows => "row order",
        BlockOrder::EightRows => "eights",
    };
    [
        ("instruction set", "cpu, ", " kernels", simd_path().map_or("gemm-only", |p| p.name())),
        ("bf16 products over many rows", "bf16 products on ", " (", matrix_path()),
        ("bf16 products over few rows", "(few rows: ", ")", few_rows_path()),
        ("8-bit x", "8-bit x by ", ",", byte_products_path()),
        ("resident quantized weights", "resident blocks in ", ",", order),
    ]
}

/// "avx512 kernels, bf16 products on amx (few rows: pairs), 8-bit x by vnni, resident
/// blocks in eights": what a cpu profile's provenance records after "cpu, ".
pub fn description() -> String {
    let [simd, matrix, few, bytes, order] = choices().map(|(_, _, _, value)| value);
    format!(
        "{simd} kernels, bf16 products on {matrix} (few rows: {few}), 8-bit x by {bytes}, resident blocks in {order}"
    )
}

/// A note when a cpu profile's provenance names other kernels than this process
/// runs; `None` when every choice it names agrees (a profile from before a choice
/// was recorded is not judged on it) or the profile is not a cpu backend's.
pub fn kernels_mismatch(provenance: &str) -> Option<String> {
    differences(provenance, &choices())
}

fn differences(provenance: &str, choices: &[(&str, &str, &str, &str)]) -> Option<String> {
    if !provenance.starts_with("cpu") {
        return None;
    }
    let differ: Vec<String> = choices
        .iter()
        .filter_map(|&(what, before, after, running)| {
            let start = provenance.find(before)? + before.len();
            let measured = &provenance[start..][..provenance[start..].find(after)?];
            (measured != running).then(|| format!("{what}: {measured} in the profile, {running} here"))
        })
        .collect();
    (!differ.is_empty()).then(|| {
        format!(
            "the profile timed other kernels than this run executes ({}): its kernel table misprices this \
             run; measure the profile again here, or run with the FERRY_SIMD, FERRY_AMX, FERRY_BF16_PAIRS, \
             FERRY_VNNI and FERRY_BLOCK_ORDER settings it was measured with",
            differ.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: [(&str, &str, &str, &str); 5] = [
        ("instruction set", "cpu, ", " kernels", "avx512"),
        ("bf16 products over many rows", "bf16 products on ", " (", "f32"),
        ("bf16 products over few rows", "(few rows: ", ")", "pairs"),
        ("8-bit x", "8-bit x by ", ",", "vnni"),
        ("resident quantized weights", "resident blocks in ", ",", "eights"),
    ];

    #[test]
    fn a_profile_of_the_same_kernels_gets_no_note_and_another_choice_is_named() {
        let same = "cpu, avx512 kernels, bf16 products on f32 (few rows: pairs), 8-bit x by vnni, \
                    resident blocks in eights, weights in huge pages (profiled in 20 s)";
        assert_eq!(differences(same, &HERE), None);
        let other = same.replace("by vnni", "by maddubs").replace("avx512 kernels", "avx2 kernels");
        let other = other.replace("in eights", "in row order");
        let note = differences(&other, &HERE).expect("a note");
        assert!(note.contains("8-bit x: maddubs in the profile, vnni here"), "{note}");
        assert!(note.contains("resident quantized weights: row order in the profile, eights here"), "{note}");
        assert!(note.contains("instruction set: avx2 in the profile, avx512 here"), "{note}");
        assert!(!note.contains("few rows"), "{note}");
    }

    #[test]
    fn a_choice_the_profile_predates_and_other_backends_are_not_judged() {
        let old =
            "cpu, avx512 kernels, bf16 products on f32 (few rows: pairs), weights in huge pages (profiled in 9 s)";
        assert_eq!(differences(old, &HERE), None);
        assert_eq!(differences("cuda, NVIDIA H200, cuBLAS", &HERE), None);
    }

    #[test]
    fn this_process_agrees_with_its_own_description() {
        let provenance = format!("cpu, {}, weights in huge pages (profiled in 1 s)", description());
        assert_eq!(kernels_mismatch(&provenance), None);
    }
}
