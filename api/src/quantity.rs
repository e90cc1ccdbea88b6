//! CPU and memory/storage quantities in the Kubernetes notation.
//!
//! CPU is counted in millicores: `"500m"`, `"2"`, `"0.5"` (a bare number
//! is cores). Sizes are bytes with an optional binary (`Ki`, `Mi`, `Gi`,
//! `Ti`, `Pi`, `Ei`) or decimal (`k`, `M`, `G`, `T`, `P`, `E`) suffix:
//! `"512Mi"`, `"1.5Gi"`, `"1G"`, `"1000"`. Arithmetic is exact (no floating
//! point); a fractional byte count rounds up.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// At most this many digits in a number (keeps the arithmetic in u128).
const MAX_DIGITS: usize = 20;

/// A non-negative decimal number as `(digits without the point, digits
/// after the point)`.
fn decimal(num: &str) -> Option<(u128, u32)> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.len() + frac.len() == 0
        || int.len() + frac.len() > MAX_DIGITS
        || !all_digits(int)
        || !all_digits(frac)
    {
        return None;
    }
    let mut m: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        m = m * 10 + u128::from(b - b'0');
    }
    Some((m, frac.len() as u32))
}

/// Millicores from `"500m"`, `"2"`, `"0.5"`, `"1.25"`.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        if s.starts_with('-') {
            format!("must not be negative, got {s:?}")
        } else {
            format!("{s:?} is not a CPU quantity: expected millicores (\"500m\") or cores (\"2\", \"0.5\")")
        }
    };
    if let Some(m) = s.strip_suffix('m') {
        if m.contains('.') {
            return Err(format!(
                "{s:?}: millicores must be a whole number (1m is the smallest CPU unit)"
            ));
        }
        let (v, _) = decimal(m).ok_or_else(bad)?;
        return u64::try_from(v).map_err(|_| format!("{s:?} is too large"));
    }
    let (v, scale) = decimal(s).ok_or_else(bad)?;
    let millis = if scale <= 3 {
        v * 10u128.pow(3 - scale)
    } else {
        let div = 10u128.pow(scale - 3);
        if v % div != 0 {
            return Err(format!(
                "{s:?} is more precise than 1m, the smallest CPU unit (a thousandth of a core)"
            ));
        }
        v / div
    };
    u64::try_from(millis).map_err(|_| format!("{s:?} is too large"))
}

const BYTE_UNITS: [(&str, u128); 12] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
];

/// Bytes from `"512Mi"`, `"1Gi"`, `"1G"`, `"1000"`, `"1.5Gi"`; a
/// fractional result rounds up to the next byte.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        if s.starts_with('-') {
            format!("must not be negative, got {s:?}")
        } else {
            format!(
                "{s:?} is not a size: expected a number with an optional unit Ki, Mi, Gi, Ti, Pi, Ei (binary) or k, M, G, T, P, E (decimal), e.g. \"512Mi\", \"10Gi\""
            )
        }
    };
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u128 = if unit.is_empty() {
        1
    } else if unit == "E" {
        1_000_000_000_000_000_000
    } else {
        BYTE_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    let (v, scale) = decimal(num).ok_or_else(bad)?;
    let total = v
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    let div = 10u128.pow(scale);
    let bytes = total.div_ceil(div);
    u64::try_from(bytes).map_err(|_| format!("{s:?} is too large"))
}

/// The text of a JSON string or number, as a quantity would be written.
fn json_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "must be a quantity (a string or a number), got {other}"
        )),
    }
}

/// Millicores from a JSON string (`"500m"`) or number (`2`, `0.5`).
pub fn cpu_millis_from_json(v: &Value) -> Result<u64, String> {
    parse_cpu_millis(&json_text(v)?)
}

/// Bytes from a JSON string (`"1Gi"`) or number (`1048576`).
pub fn bytes_from_json(v: &Value) -> Result<u64, String> {
    parse_bytes(&json_text(v)?)
}

/// 2000 → `"2"`, 1500 → `"1500m"`.
pub fn format_cpu_millis(m: u64) -> String {
    if m.is_multiple_of(1000) {
        (m / 1000).to_string()
    } else {
        format!("{m}m")
    }
}

/// Binary units: exact when whole (`"24Gi"`, `"512Mi"`), otherwise one
/// decimal (`"23.4Gi"`); under 1Ki, plain bytes (`"100"`).
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let b = u128::from(b);
    let Some(i) = (0..UNITS.len())
        .rev()
        .find(|i| b >= 1u128 << (10 * (i + 1)))
    else {
        return b.to_string();
    };
    let unit = 1u128 << (10 * (i + 1));
    if b % unit == 0 {
        return format!("{}{}", b / unit, UNITS[i]);
    }
    // Tenths, rounded half up; 1023.96Mi shows as 1.0Gi, not 1024.0Mi.
    let tenths = (b * 10 + unit / 2) / unit;
    if tenths >= 10240 && i + 1 < UNITS.len() {
        let next = unit << 10;
        let tenths = (b * 10 + next / 2) / next;
        return format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[i + 1]);
    }
    format!("{}.{}{}", tenths / 10, tenths % 10, UNITS[i])
}

/// A quantity as written in a manifest: a string, or a bare number (kept
/// as its text, so `2` becomes `"2"`). Whether it is a valid CPU or size
/// quantity is checked where it is used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Quantity(pub String);

impl Quantity {
    /// As millicores.
    pub fn cpu_millis(&self) -> Result<u64, String> {
        parse_cpu_millis(&self.0)
    }

    /// As bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        parse_bytes(&self.0)
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a quantity such as \"500m\", \"2\" or \"1Gi\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_string())
    }
}

impl From<String> for Quantity {
    fn from(s: String) -> Self {
        Quantity(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cpu_parse() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("1.25"), Ok(1250));
        assert_eq!(parse_cpu_millis("0.001"), Ok(1));
        assert_eq!(parse_cpu_millis(" 3 "), Ok(3000));
        assert_eq!(parse_cpu_millis("0"), Ok(0));
        assert!(parse_cpu_millis("lots")
            .unwrap_err()
            .contains("not a CPU quantity"));
        assert!(parse_cpu_millis("").is_err());
        assert!(parse_cpu_millis("m").is_err());
        assert!(parse_cpu_millis("1.2.3").is_err());
        assert!(parse_cpu_millis("-1")
            .unwrap_err()
            .contains("must not be negative"));
        assert!(parse_cpu_millis("1.5m")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_cpu_millis("0.0005")
            .unwrap_err()
            .contains("more precise than 1m"));
        assert!(parse_cpu_millis("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn cpu_from_json() {
        assert_eq!(cpu_millis_from_json(&json!(2)), Ok(2000));
        assert_eq!(cpu_millis_from_json(&json!(0.5)), Ok(500));
        assert_eq!(cpu_millis_from_json(&json!("250m")), Ok(250));
        assert!(cpu_millis_from_json(&json!(-1)).is_err());
        assert!(cpu_millis_from_json(&json!(true))
            .unwrap_err()
            .contains("a string or a number"));
    }

    #[test]
    fn cpu_format() {
        assert_eq!(format_cpu_millis(2000), "2");
        assert_eq!(format_cpu_millis(1500), "1500m");
        assert_eq!(format_cpu_millis(0), "0");
        assert_eq!(format_cpu_millis(1), "1m");
        for m in [1, 100, 999, 1000, 1500, 64000] {
            assert_eq!(parse_cpu_millis(&format_cpu_millis(m)), Ok(m));
        }
    }

    #[test]
    fn bytes_parse() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("2k"), Ok(2000));
        assert_eq!(parse_bytes("1Ei"), Ok(1 << 60));
        assert_eq!(parse_bytes("1E"), Ok(1_000_000_000_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        // Exact for large values, where f64 would not be.
        assert_eq!(parse_bytes("9007199254740993"), Ok(9_007_199_254_740_993));
        // A fractional byte rounds up.
        assert_eq!(parse_bytes("0.1Ki"), Ok(103));
        assert_eq!(parse_bytes("1.5"), Ok(2));
        assert!(parse_bytes("1Xi").unwrap_err().contains("not a size"));
        assert!(parse_bytes("1GB").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("-1Gi")
            .unwrap_err()
            .contains("must not be negative"));
        assert!(parse_bytes("16Ei").unwrap_err().contains("too large"));
    }

    #[test]
    fn bytes_from_json_values() {
        assert_eq!(bytes_from_json(&json!(1048576)), Ok(1 << 20));
        assert_eq!(bytes_from_json(&json!("1Mi")), Ok(1 << 20));
        assert!(bytes_from_json(&json!(null)).is_err());
    }

    #[test]
    fn bytes_format() {
        assert_eq!(format_bytes(24 << 30), "24Gi");
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(1536), "1.5Ki");
        assert_eq!(format_bytes(100), "100");
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_bytes(1024), "1Ki");
        // 23.4 GiB, not whole.
        assert_eq!(format_bytes(25_125_558_681), "23.4Gi");
        // Just under 1Gi rounds into the next unit.
        assert_eq!(format_bytes((1 << 30) - 1), "1.0Gi");
        assert_eq!(format_bytes(u64::MAX), "16.0Ei");
        for b in [1u64 << 10, 3 << 29, 7 << 40, 1000] {
            let s = format_bytes(b);
            if !s.contains('.') {
                assert_eq!(parse_bytes(&s), Ok(b), "{s}");
            }
        }
    }

    #[test]
    fn quantity_accepts_strings_and_numbers() {
        let q: Quantity = serde_json::from_value(json!(2)).unwrap();
        assert_eq!(q, Quantity("2".into()));
        assert_eq!(q.cpu_millis(), Ok(2000));
        let q: Quantity = serde_json::from_value(json!(0.5)).unwrap();
        assert_eq!(q.cpu_millis(), Ok(500));
        let q: Quantity = serde_json::from_value(json!("1Gi")).unwrap();
        assert_eq!(q.bytes(), Ok(1 << 30));
        assert_eq!(serde_json::to_value(&q).unwrap(), json!("1Gi"));
        assert_eq!(q.to_string(), "1Gi");
        let e = serde_json::from_value::<Quantity>(json!(true)).unwrap_err();
        assert!(e.to_string().contains("a quantity such as"));
    }
}
