//! What an image is made of: [`ImageSpec`] and its validation.
//!
//! A spec is plain data. [`ImageSpec::validate`] checks every field and
//! turns the files and directories into the sorted tree that becomes the
//! image's single layer (parent directories added, modes fixed), so that
//! nothing about the build machine — file owners, permissions, times,
//! directory order — can leak into an image.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::ImageError;

/// Mode of a parent directory that the spec does not list itself.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// A file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path inside the image, e.g. `/bin/records-server`.
    pub path_in_image: String,
    /// The file on the build machine whose bytes are copied.
    pub source: PathBuf,
    /// Permission bits in the image (e.g. `0o755`); the source file's own
    /// permissions are ignored.
    pub mode: u32,
}

/// An (empty unless files go into it) directory in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDir {
    /// Absolute path inside the image, e.g. `/tmp`.
    pub path_in_image: String,
    /// Permission bits, e.g. `0o1777` for `/tmp`.
    pub mode: u32,
}

/// How the layer blob is stored. Either way the config's `diff_ids` are
/// the digest of the uncompressed tar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LayerCompression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`, level 9, with a
    /// fixed gzip header (mtime 0, no file name, OS "unknown").
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

/// Everything an image is built from. Two builds of equal specs over
/// equal source files give byte-identical layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Repository name, e.g. `ironmesh/records-server`.
    pub name: String,
    /// Tag, e.g. `dev`.
    pub tag: String,
    /// `config.Entrypoint`; must not be empty.
    pub entrypoint: Vec<String>,
    /// `config.Env`, each `NAME=value`.
    pub env: Vec<String>,
    /// `config.WorkingDir`; absolute.
    pub working_dir: String,
    pub files: Vec<ImageFile>,
    /// Directories to create besides the parents of `files`.
    pub directories: Vec<ImageDir>,
    /// `config.ExposedPorts`: `8080/tcp`, `53/udp`, or a bare `8080`
    /// (meaning tcp).
    pub exposed_ports: Vec<String>,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch used for every tar entry's mtime and for
    /// `created`: 0 unless the build takes `SOURCE_DATE_EPOCH`
    /// (see [`source_date_epoch`]).
    pub epoch: u64,
    pub compression: LayerCompression,
}

impl ImageSpec {
    /// A spec with no files, working directory `/`, epoch 0 and a gzip
    /// layer.
    pub fn new(name: impl Into<String>, tag: impl Into<String>) -> Self {
        ImageSpec {
            name: name.into(),
            tag: tag.into(),
            entrypoint: Vec::new(),
            env: Vec::new(),
            working_dir: "/".to_string(),
            files: Vec::new(),
            directories: Vec::new(),
            exposed_ports: Vec::new(),
            labels: BTreeMap::new(),
            epoch: 0,
            compression: LayerCompression::Gzip,
        }
    }

    /// `name:tag`, the name the image gets in containerd.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ImageError {
        ImageError::InvalidSpec {
            image: self.reference(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Checks every field and returns the layer tree and normalised ports.
    pub(crate) fn validate(&self) -> Result<ValidSpec, ImageError> {
        check_name(&self.name).map_err(|r| self.invalid(format!("name {:?}", self.name), r))?;
        ironmesh_oci::name::check_tag(&self.tag)
            .map_err(|r| self.invalid(format!("tag {:?}", self.tag), r.to_string()))?;
        if self.entrypoint.is_empty() {
            return Err(self.invalid("entrypoint", "must name the program to run"));
        }
        if self.entrypoint[0].is_empty() {
            return Err(self.invalid("entrypoint[0]", "must not be empty"));
        }
        for (i, arg) in self.entrypoint.iter().enumerate() {
            if arg.contains('\0') {
                return Err(self.invalid(format!("entrypoint[{i}]"), "contains a NUL byte"));
            }
        }
        for (i, var) in self.env.iter().enumerate() {
            let field = || format!("env[{i}] {var:?}");
            match var.split_once('=') {
                Some((name, _)) if !name.is_empty() => {}
                _ => return Err(self.invalid(field(), "must be NAME=value")),
            }
            if var.contains('\0') {
                return Err(self.invalid(field(), "contains a NUL byte"));
            }
        }
        if !self.working_dir.starts_with('/') || self.working_dir.contains('\0') {
            return Err(self.invalid(
                format!("working_dir {:?}", self.working_dir),
                "must be an absolute path",
            ));
        }
        for (key, value) in &self.labels {
            if key.is_empty() {
                return Err(self.invalid("labels", "a label has an empty key"));
            }
            if key.contains('\0') || value.contains('\0') {
                return Err(self.invalid(format!("labels[{key:?}]"), "contains a NUL byte"));
            }
        }
        let mut ports = BTreeMap::new();
        for (i, port) in self.exposed_ports.iter().enumerate() {
            let normal = normalize_port(port)
                .map_err(|r| self.invalid(format!("exposed_ports[{i}] {port:?}"), r))?;
            ports.insert(normal, ());
        }

        let mut tree: BTreeMap<String, Node> = BTreeMap::new();
        for (i, dir) in self.directories.iter().enumerate() {
            let field = || format!("directories[{i}] {:?}", dir.path_in_image);
            let path = normalize_path(&dir.path_in_image).map_err(|r| self.invalid(field(), r))?;
            check_mode(dir.mode).map_err(|r| self.invalid(field(), r))?;
            if tree.insert(path, Node::Dir { mode: dir.mode }).is_some() {
                return Err(self.invalid(field(), "listed twice"));
            }
        }
        for (i, file) in self.files.iter().enumerate() {
            let field = || format!("files[{i}] {:?}", file.path_in_image);
            let path = normalize_path(&file.path_in_image).map_err(|r| self.invalid(field(), r))?;
            check_mode(file.mode).map_err(|r| self.invalid(field(), r))?;
            let node = Node::File {
                mode: file.mode,
                index: i,
            };
            if let Some(old) = tree.insert(path, node) {
                let what = match old {
                    Node::Dir { .. } => "also listed as a directory",
                    Node::File { .. } => "listed twice",
                };
                return Err(self.invalid(field(), what));
            }
        }
        // Parents of everything, and no file used as a parent.
        let paths: Vec<String> = tree.keys().cloned().collect();
        for path in paths {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                match tree.get(parent) {
                    Some(Node::Dir { .. }) => {}
                    Some(Node::File { index, .. }) => {
                        let index = *index;
                        return Err(self.invalid(
                            format!("files[{index}] {:?}", self.files[index].path_in_image),
                            format!("is a file but /{path} is inside it"),
                        ));
                    }
                    None => {
                        tree.insert(
                            parent.to_string(),
                            Node::Dir {
                                mode: DEFAULT_DIR_MODE,
                            },
                        );
                    }
                }
            }
        }
        Ok(ValidSpec {
            tree,
            ports: ports.into_keys().collect(),
        })
    }
}

/// A validated spec: the layer's entries, sorted so that every directory
/// comes before what it contains, and the normalised exposed ports.
pub(crate) struct ValidSpec {
    /// Path (relative, no leading or trailing `/`) → entry.
    pub tree: BTreeMap<String, Node>,
    /// `8080/tcp`, …, sorted.
    pub ports: Vec<String>,
}

/// One layer entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Dir {
        mode: u32,
    },
    /// `index` into [`ImageSpec::files`].
    File {
        mode: u32,
        index: usize,
    },
}

/// Reads `SOURCE_DATE_EPOCH`: 0 when unset or empty, an error when it is
/// not a whole number of seconds.
pub fn source_date_epoch() -> Result<u64, ImageError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(0),
        Err(std::env::VarError::NotUnicode(v)) => Err(ImageError::Env {
            name: "SOURCE_DATE_EPOCH",
            value: v.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".to_string(),
        }),
        Ok(v) if v.trim().is_empty() => Ok(0),
        Ok(v) => v.trim().parse::<u64>().map_err(|_| ImageError::Env {
            name: "SOURCE_DATE_EPOCH",
            value: v.clone(),
            reason: "must be a whole number of seconds since 1970-01-01".to_string(),
        }),
    }
}

/// `/a/b` → `a/b`; refuses `.`, `..`, empty components and the root.
fn normalize_path(path: &str) -> Result<String, String> {
    let Some(rel) = path.strip_prefix('/') else {
        return Err("must be an absolute path".to_string());
    };
    let rel = rel.strip_suffix('/').unwrap_or(rel);
    if rel.is_empty() {
        return Err("must not be the root directory".to_string());
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".to_string());
    }
    for component in rel.split('/') {
        match component {
            "" => return Err("has an empty component (//)".to_string()),
            "." | ".." => return Err(format!("has a {component:?} component")),
            _ => {}
        }
    }
    Ok(rel.to_string())
}

fn check_mode(mode: u32) -> Result<(), String> {
    if mode & !0o7777 != 0 {
        return Err(format!(
            "mode {mode:#o} has bits outside 0o7777 (give permission bits only)"
        ));
    }
    Ok(())
}

/// `8080` → `8080/tcp`; `53/UDP` → `53/udp`.
fn normalize_port(port: &str) -> Result<String, String> {
    let (number, proto) = port.split_once('/').unwrap_or((port, "tcp"));
    let proto = proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("protocol {proto:?} is not tcp, udp or sctp"));
    }
    match number.parse::<u16>() {
        Ok(n) if n > 0 && n.to_string() == number => Ok(format!("{n}/{proto}")),
        _ => Err("port must be a number from 1 to 65535".to_string()),
    }
}

/// Repository names: lowercase path components of `[a-z0-9]` separated by
/// `.`, `_`, `__` or `-`s, joined by `/` (an optional `host[:port]/`
/// first component is accepted too).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    if name.len() > 255 {
        return Err("longer than 255 characters".to_string());
    }
    for (i, component) in name.split('/').enumerate() {
        if component.is_empty() {
            return Err("has an empty path component".to_string());
        }
        let registry_host = i == 0 && name.contains('/') && component.contains([':', '.']);
        let ok_char = |c: char| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, '.' | '_' | '-')
                || (registry_host && (c == ':' || c.is_ascii_uppercase()))
        };
        if !component.chars().all(ok_char) {
            return Err(format!(
                "component {component:?} may only hold lowercase letters, digits, '.', '_' and '-'"
            ));
        }
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !alnum(component.chars().next()) || !alnum(component.chars().last()) {
            return Err(format!(
                "component {component:?} must start and end with a letter or digit"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        let mut s = ImageSpec::new("ironmesh/test", "dev");
        s.entrypoint = vec!["/bin/x".into()];
        s
    }

    fn file(path: &str) -> ImageFile {
        ImageFile {
            path_in_image: path.into(),
            source: "/dev/null".into(),
            mode: 0o755,
        }
    }

    fn err(s: &ImageSpec) -> String {
        match s.validate() {
            Ok(_) => panic!("spec accepted: {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parents_are_added_in_order() {
        let mut s = spec();
        s.files = vec![file("/usr/local/bin/x"), file("/bin/x")];
        s.directories = vec![ImageDir {
            path_in_image: "/tmp/".into(),
            mode: 0o1777,
        }];
        let v = s.validate().unwrap();
        let got: Vec<(&str, Node)> = v.tree.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            got,
            vec![
                ("bin", Node::Dir { mode: 0o755 }),
                (
                    "bin/x",
                    Node::File {
                        mode: 0o755,
                        index: 1
                    }
                ),
                ("tmp", Node::Dir { mode: 0o1777 }),
                ("usr", Node::Dir { mode: 0o755 }),
                ("usr/local", Node::Dir { mode: 0o755 }),
                ("usr/local/bin", Node::Dir { mode: 0o755 }),
                (
                    "usr/local/bin/x",
                    Node::File {
                        mode: 0o755,
                        index: 0
                    }
                ),
            ]
        );
    }

    #[test]
    fn bad_paths_are_named() {
        for bad in ["bin/x", "/", "/a/../b", "/a//b", "/./a"] {
            let mut s = spec();
            s.files = vec![file(bad)];
            let e = err(&s);
            assert!(e.contains(&format!("files[0] {bad:?}")), "{e}");
        }
        let mut s = spec();
        s.files = vec![file("/bin/x"), file("/bin/x/y")];
        assert!(err(&s).contains("is a file but /bin/x/y is inside it"));
        let mut s = spec();
        s.files = vec![file("/bin/x"), file("/bin/x")];
        assert!(err(&s).contains("listed twice"));
        let mut s = spec();
        s.files = vec![ImageFile {
            mode: 0o100755,
            ..file("/x")
        }];
        assert!(err(&s).contains("outside 0o7777"));
    }

    #[test]
    fn names_tags_ports_env() {
        for bad in ["Ironmesh/x", "ironmesh//x", "-x", "x-", ""] {
            let mut s = spec();
            s.name = bad.into();
            assert!(err(&s).contains("name"), "{bad}");
        }
        let mut s = spec();
        s.name = "localhost:5000/ironmesh/x".into();
        s.validate().unwrap();
        for bad in ["", ".x", "a:b", "a/b"] {
            let mut s = spec();
            s.tag = bad.into();
            assert!(err(&s).contains("tag"), "{bad}");
        }
        let mut s = spec();
        s.exposed_ports = vec!["8080".into(), "53/UDP".into(), "8080/tcp".into()];
        assert_eq!(s.validate().unwrap().ports, vec!["53/udp", "8080/tcp"]);
        for bad in ["0", "65536", "80/icmp", "http", "080"] {
            let mut s = spec();
            s.exposed_ports = vec![bad.into()];
            assert!(err(&s).contains("exposed_ports[0]"), "{bad}");
        }
        let mut s = spec();
        s.env = vec!["NOEQUALS".into()];
        assert!(err(&s).contains("env[0]"));
        let mut s = spec();
        s.entrypoint.clear();
        assert!(err(&s).contains("entrypoint"));
    }
}
