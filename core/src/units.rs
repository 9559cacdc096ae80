//! Byte sizes and rates as people write them (`512MiB`, `6GB`, `1.5 GiB`) and as
//! Ferry prints them. Decimal prefixes (kB, MB, GB) are powers of 1000 and binary
//! prefixes (KiB, MiB, GiB) powers of 1024, as on datasheets.

use crate::error::{CoreError, Result};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const GB: f64 = 1e9;

/// Parses a byte size such as `512MiB`, `6GB`, `1.5 GiB`, `4096` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number = number.replace('_', "");
    let not_a_size = || CoreError::invalid(format!("'{text}' is not a byte size (examples: 512MiB, 6GB, 1.5GiB)"));
    if number.is_empty() || number == "." {
        return Err(not_a_size());
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => GIB * 1024,
        other => {
            return Err(CoreError::invalid(format!(
                "'{text}': unknown unit '{other}' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            )))
        }
    };
    let out_of_range = || CoreError::invalid(format!("'{text}' is out of range: at most 16 EiB (2^64 - 1 bytes)"));
    // Whole numbers exactly (an f64 rounds past 2^53 and saturates at 2^64), so a size
    // that does not fit is an error rather than a silently different one.
    if !number.contains('.') {
        let whole: u128 =
            if number.len() > 39 { return Err(out_of_range()) } else { number.parse().map_err(|_| not_a_size())? };
        return u64::try_from(whole * u128::from(multiplier)).map_err(|_| out_of_range());
    }
    let bytes = number.parse::<f64>().map_err(|_| not_a_size())? * multiplier as f64;
    // 2^64 itself is out of range: `u64::MAX as f64` rounds up to it.
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(out_of_range());
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary prefix and three significant figures: `12.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    let units = [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, size) in units {
        if bytes >= size {
            let value = bytes as f64 / size as f64;
            return if value >= 100.0 {
                format!("{value:.0} {name}")
            } else if value >= 10.0 {
                format!("{value:.1} {name}")
            } else {
                format!("{value:.2} {name}")
            };
        }
    }
    format!("{bytes} B")
}

/// `Some("256MiB")` when `bytes` is a whole number of GiB, MiB or KiB (and not zero).
pub fn exact_binary_size(bytes: u64) -> Option<String> {
    [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)]
        .into_iter()
        .find(|(_, size)| bytes > 0 && bytes.is_multiple_of(*size))
        .map(|(name, size)| format!("{}{name}", bytes / size))
}

/// Formats a duration in integer nanoseconds for people: `1.23 s`, `45.6 ms`, `789 µs`.
pub fn format_ns(ns: u64) -> String {
    let value = ns as f64;
    if value >= 1e9 {
        format!("{:.3} s", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2} ms", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} µs", value / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// serde helper: a byte count that may be written as a number or a string like `6GiB`.
pub mod bytes_serde {
    use serde::{de, Deserializer, Serializer};

    /// Written the way people write sizes (`256MiB`, `12GiB`) when that is exact, so plan
    /// files read well; any other count as a plain number.
    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        match super::exact_binary_size(*value) {
            Some(text) => serializer.serialize_str(&text),
            None => serializer.serialize_u64(*value),
        }
    }

    /// A visitor (not an untagged enum) so the parser keeps the error's line.
    struct BytesVisitor;

    impl de::Visitor<'_> for BytesVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte count such as 4096, 512MiB or 6GB")
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value).map_err(|_| E::custom("a byte count cannot be negative"))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
            if value >= 0.0 && value.is_finite() {
                Ok(value.round() as u64)
            } else {
                Err(E::custom("a byte count must be a non-negative number"))
            }
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            super::parse_bytes(text).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// serde helper: an optional byte count, written like `bytes_serde`.
pub mod opt_bytes_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => super::bytes_serde::serialize(v, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapper(#[serde(with = "super::bytes_serde")] u64);
        Option::<Wrapper>::deserialize(deserializer).map(|o| o.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_binary_units() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_bytes("6GB").unwrap(), 6_000_000_000);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("12gib").unwrap(), 12 * GIB);
    }

    #[test]
    fn rejects_garbage_with_a_message() {
        let err = parse_bytes("lots").unwrap_err().to_string();
        assert!(err.contains("not a byte size"), "{err}");
        let err = parse_bytes("5 parsecs").unwrap_err().to_string();
        assert!(err.contains("unknown unit"), "{err}");
    }

    #[test]
    fn sizes_past_u64_are_errors_not_saturated() {
        assert_eq!(parse_bytes("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(parse_bytes("9007199254740993B").unwrap(), 9_007_199_254_740_993, "exact past 2^53");
        for text in ["18446744073709551616", "18446744073709551616B", "16777216TiB", "18446744073709551616.0"] {
            let err = parse_bytes(text).map(|b| b.to_string()).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{text}: {err}");
        }
        let err = parse_bytes(&"9".repeat(60)).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn formats_with_binary_prefixes() {
        assert_eq!(format_bytes(512 * MIB), "512 MiB");
        assert_eq!(format_bytes(3 * GIB / 2), "1.50 GiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_ns(1_500_000), "1.50 ms");
        assert_eq!(exact_binary_size(256 * MIB).as_deref(), Some("256MiB"));
        assert_eq!(exact_binary_size(12 * GIB).as_deref(), Some("12GiB"));
        assert_eq!(exact_binary_size(1000), None);
        assert_eq!(parse_bytes(&exact_binary_size(3 * KIB).unwrap()).unwrap(), 3 * KIB);
    }
}
