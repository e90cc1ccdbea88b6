//! Splitting multi-document YAML manifests into JSON documents.
//!
//! Documents are numbered as a reader counts them: the Nth
//! `---`-separated document of the file, 1-based, empty documents (only
//! comments, or nothing between two `---`) included in the count but not
//! returned. So an error can say "web.yaml, document 3".

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// What one text may expand to, in bytes (16 per node plus string
/// lengths), counted across aliases: at least this, or 16 times the text.
/// A 3 MB "billion laughs" document would otherwise expand to terabytes
/// (serde_norway bounds alias jumps per event, not the expansion).
pub const MIN_EXPANSION_BUDGET: usize = 64 << 20;
const NODE_COST: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// `message` is serde_norway's, with the line and column in the file.
    #[error("document {document}: {message}")]
    Yaml { document: usize, message: String },
}

/// The documents of a YAML text as `(number, json)`, numbered as a reader
/// counts them; empty documents are skipped but counted. Merge keys
/// (`<<: *anchor`) are applied.
pub fn parse_yaml_documents_numbered(text: &str) -> Result<Vec<(usize, Value)>, ManifestError> {
    let mut out = Vec::new();
    // After a syntax error serde_norway's document iterator repeats the error
    // forever; the `?` below stops at the first one.
    let budget = MIN_EXPANSION_BUDGET.max(text.len().saturating_mul(16));
    let left = Cell::new(budget);
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let yaml_err = |e: serde_norway::Error| ManifestError::Yaml {
            document,
            message: e.to_string(),
        };
        let mut y = Budgeted {
            left: &left,
            budget,
        }
        .deserialize(de)
        .map_err(yaml_err)?;
        if y.is_null() {
            continue;
        }
        y.apply_merge().map_err(yaml_err)?;
        let j = serde_json::to_value(&y).map_err(|e| ManifestError::Yaml {
            document,
            message: format!("cannot be represented as JSON: {e}"),
        })?;
        out.push((document, j));
    }
    Ok(out)
}

/// Deserializes a `serde_norway::Value`, spending from `left` for every node
/// it builds, aliases replayed included.
#[derive(Clone, Copy)]
struct Budgeted<'a> {
    left: &'a Cell<usize>,
    budget: usize,
}

impl Budgeted<'_> {
    fn spend<E: de::Error>(&self, n: usize) -> Result<(), E> {
        let left = self.left.get();
        if n > left {
            self.left.set(0);
            return Err(E::custom(format!(
                "expands to more than {} MiB (through YAML aliases and anchors?); the limit keeps the controller's memory bounded: write the values out or split the file",
                self.budget >> 20
            )));
        }
        self.left.set(left - n);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Budgeted<'_> {
    type Value = serde_norway::Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<serde_norway::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budgeted<'_> {
    type Value = serde_norway::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        self.spend(NODE_COST)?;
        Ok(serde_norway::Value::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        self.spend(NODE_COST)?;
        Ok(serde_norway::Value::Number(n.into()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        self.spend(NODE_COST)?;
        Ok(serde_norway::Value::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
        self.spend(NODE_COST)?;
        Ok(serde_norway::Value::Number(n.into()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.spend(NODE_COST.saturating_add(v.len()))?;
        Ok(serde_norway::Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.spend(NODE_COST.saturating_add(v.len()))?;
        Ok(serde_norway::Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.spend(NODE_COST)?;
        Ok(serde_norway::Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.spend(NODE_COST)?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(serde_norway::Value::Sequence(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.spend(NODE_COST)?;
        let mut out = serde_norway::Mapping::new();
        while let Some(k) = map.next_key_seed(self)? {
            if out.contains_key(&k) {
                let shown = match &k {
                    serde_norway::Value::String(s) => format!("{s:?}"),
                    other => serde_norway::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                return Err(de::Error::custom(format!(
                    "duplicate entry with key {shown}"
                )));
            }
            let v = map.next_value_seed(self)?;
            out.insert(k, v);
        }
        Ok(serde_norway::Value::Mapping(out))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(
            "YAML tags (`!name value`) are not supported in manifests",
        ))
    }
}

/// The documents of a YAML text, empty ones skipped. Errors carry the
/// document number (counting empty documents) and serde_norway's line.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    Ok(parse_yaml_documents_numbered(text)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn numbers(text: &str) -> Vec<usize> {
        parse_yaml_documents_numbered(text)
            .unwrap()
            .iter()
            .map(|(n, _)| *n)
            .collect()
    }

    #[test]
    fn single_document() {
        let docs = parse_yaml_documents("a: 1\nb: [x, y]\n").unwrap();
        assert_eq!(docs, vec![json!({"a": 1, "b": ["x", "y"]})]);
        assert_eq!(numbers("a: 1\n"), [1]);
    }

    #[test]
    fn numbers_count_empty_documents() {
        let text = "---\na: 1\n---\n# only a comment\n---\nb: 2\n";
        let docs = parse_yaml_documents_numbered(text).unwrap();
        assert_eq!(numbers(text), [1, 3]);
        assert_eq!(docs[1].1["b"], 2);
        // Back-to-back separators and a trailing one.
        assert_eq!(numbers("---\n---\na: 1\n---\n"), [2]);
        assert_eq!(numbers("a: 1\n---\n---\nb: 2\n"), [1, 3]);
        // Without a leading separator the first document is number 1.
        assert_eq!(numbers("a: 1\n---\nb: 2\n"), [1, 2]);
        assert_eq!(
            parse_yaml_documents("a: 1\n---\n---\nb: 2\n").unwrap(),
            vec![json!({"a": 1}), json!({"b": 2})]
        );
    }

    #[test]
    fn empty_texts_have_no_documents() {
        assert!(parse_yaml_documents("").unwrap().is_empty());
        assert!(parse_yaml_documents("# nothing here\n").unwrap().is_empty());
        assert!(parse_yaml_documents("---\n---\n").unwrap().is_empty());
    }

    #[test]
    fn syntax_error_names_document_and_line() {
        let text = "a: 1\n---\nb: 2\n---\nc: [1, 2\n";
        let e = parse_yaml_documents(text).unwrap_err();
        let ManifestError::Yaml { document, message } = &e;
        assert_eq!(*document, 3);
        let s = e.to_string();
        assert!(s.starts_with("document 3: "), "{s}");
        // The line is counted in the whole file.
        assert!(message.contains("line 6"), "{message}");
    }

    #[test]
    fn syntax_error_after_empty_documents() {
        let text = "a: 1\n---\n# empty\n---\nb: 1\n\tc: 2\n";
        let e = parse_yaml_documents(text).unwrap_err();
        assert!(e.to_string().starts_with("document 3: "), "{e}");
        assert!(e.to_string().contains("line 6"), "{e}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse_yaml_documents("a: 1\n---\nb: 2\nb: 3\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("document 2: duplicate entry with key \"b\""),
            "{s}"
        );
    }

    #[test]
    fn an_alias_bomb_is_refused_not_expanded() {
        // Each level doubles ten times: 10^9 strings at the last level.
        let mut text = String::from("a0: &a0 [\"lol lol lol lol lol lol lol lol\"]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            let row = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{row}]\n"));
        }
        let e = parse_yaml_documents(&text).unwrap_err().to_string();
        assert!(
            e.contains("repetition limit exceeded") || e.contains("expands to more than"),
            "{e}"
        );
        // Few events, so serde_norway's own bound (jumps per event) lets it
        // through, but 1,000 copies of a 100 kB string are 100 MB.
        let big = "x".repeat(100_000);
        let mut text = format!("s: &s {big}\nl:\n");
        for _ in 0..1000 {
            text.push_str("  - *s\n");
        }
        let started = std::time::Instant::now();
        let e = parse_yaml_documents(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("document 1: l[669]: expands to more than 64 MiB"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // A few aliases are fine.
        let docs = parse_yaml_documents("x: &x [1, 2]\ny: *x\n").unwrap();
        assert_eq!(docs[0]["y"], json!([1, 2]));
    }

    #[test]
    fn tags_are_refused_with_a_reason() {
        let e = parse_yaml_documents("a: !thing 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("YAML tags"), "{e}");
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "base: &b {x: 1}\nderived:\n  <<: *b\n  y: 2\n";
        let docs = parse_yaml_documents(text).unwrap();
        assert_eq!(docs[0]["derived"], json!({"x": 1, "y": 2}));
    }

    #[test]
    fn scalars_keep_their_yaml_types() {
        let docs = parse_yaml_documents("a: \"1\"\nb: 1\nc: true\nd: 0.5\ne: ~\n").unwrap();
        assert_eq!(
            docs[0],
            json!({"a": "1", "b": 1, "c": true, "d": 0.5, "e": null})
        );
    }
}
