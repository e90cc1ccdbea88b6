//! Reading manifests from files and directories into documents for
//! `Apply`, each tagged with where it came from ("web.yaml, document 2") so
//! errors can name it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ironmesh_api::ManifestError;
use ironmesh_proto::v1::Manifest;

/// Reads every file (directories expanded to their *.yaml, *.yml, *.json
/// files, sorted) and splits multi-document YAML. Fails on the first
/// unreadable or unparsable document, naming file and document.
pub fn load(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<Manifest>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            collect_dir(p, recursive, &mut files)?;
        } else if p.exists() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    if files.is_empty() {
        bail!("no manifest files (*.yaml, *.yml, *.json) found");
    }
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let docs = ironmesh_api::parse_yaml_documents_numbered(&text).map_err(|e| match e {
            ManifestError::Yaml { document, message } => {
                anyhow::anyhow!("{}, document {document}: {message}", f.display())
            }
        })?;
        for (number, doc) in docs {
            out.push(Manifest {
                origin: format!("{}, document {number}", f.display()),
                json: doc.to_string(),
            });
        }
    }
    if out.is_empty() {
        bail!("the manifests contain no documents");
    }
    Ok(out)
}

fn collect_dir(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recursive {
                collect_dir(&p, recursive, out)?;
            }
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_read_in_order_and_documents_are_numbered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: ironmesh.dev/v1\nkind: Volume\nmetadata: {name: v}\nspec: {size: 1Gi}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("a.yaml"), "a: 1\n---\nb: 2\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let m = load(&[dir.path().to_path_buf()], false).unwrap();
        let origins: Vec<_> = m
            .iter()
            .map(|m| m.origin.rsplit('/').next().unwrap().to_string())
            .collect();
        assert_eq!(
            origins,
            [
                "a.yaml, document 1",
                "a.yaml, document 2",
                "b.yaml, document 1"
            ]
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = load(&[PathBuf::from("/nonexistent/x.yaml")], false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.yaml"), "{err}");
    }
}
