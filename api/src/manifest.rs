//! Splitting multi-document YAML manifests into JSON documents.
//!
//! Documents are numbered as a reader counts them: the Nth
//! `---`-separated document of the file, 1-based, empty documents (only
//! comments, or nothing between two `---`) included in the count but not
//! returned. So an error can say "web.yaml, document 3".

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// `message` is serde_yaml's, with the line and column in the file.
    #[error("document {document}: {message}")]
    Yaml { document: usize, message: String },
}

/// The documents of a YAML text as `(number, json)`, numbered as a reader
/// counts them; empty documents are skipped but counted. Merge keys
/// (`<<: *anchor`) are applied.
pub fn parse_yaml_documents_numbered(text: &str) -> Result<Vec<(usize, Value)>, ManifestError> {
    let mut out = Vec::new();
    // After a syntax error serde_yaml's document iterator repeats the error
    // forever; the `?` below stops at the first one.
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let yaml_err = |e: serde_yaml::Error| ManifestError::Yaml {
            document,
            message: e.to_string(),
        };
        let mut y = serde_yaml::Value::deserialize(de).map_err(yaml_err)?;
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

/// The documents of a YAML text, empty ones skipped. Errors carry the
/// document number (counting empty documents) and serde_yaml's line.
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
