//! Splitting multi-document YAML manifests into JSON documents.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document}: {message}")]
    Yaml { document: usize, message: String },
}

/// Documents of a YAML text as `(number, json)`, numbered as a reader
/// counts them (1-based, counting empty documents, which are skipped).
pub fn parse_yaml_documents_numbered(text: &str) -> Result<Vec<(usize, Value)>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let y = serde_yaml::Value::deserialize(de).map_err(|e| ManifestError::Yaml {
            document,
            message: e.to_string(),
        })?;
        if y.is_null() {
            continue;
        }
        let j = serde_json::to_value(&y).map_err(|e| ManifestError::Yaml {
            document,
            message: format!("cannot be represented as JSON: {e}"),
        })?;
        out.push((document, j));
    }
    Ok(out)
}

/// Documents of a YAML text, empty ones skipped.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    Ok(parse_yaml_documents_numbered(text)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_count_empty_documents() {
        let text = "---\na: 1\n---\n# only a comment\n---\nb: 2\n";
        let docs = parse_yaml_documents_numbered(text).unwrap();
        let nums: Vec<usize> = docs.iter().map(|(n, _)| *n).collect();
        assert_eq!(nums, [1, 3]);
        assert_eq!(docs[1].1["b"], 2);
    }

    #[test]
    fn syntax_error_names_document_and_line() {
        let text = "a: 1\n---\nb: 2\n---\nc: [1, 2\n";
        let e = parse_yaml_documents(text).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("document 3:"), "{s}");
        assert!(s.contains("line"), "{s}");
    }
}
