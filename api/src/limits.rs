//! Size limits on what operators may store, and how sizes and long values
//! are shown in messages. Every limit here is checked by [`crate::validate`]
//! (objects) or by the operator API and `imctl` (whole applies), and is
//! listed in docs/resources.md.

/// An object, encoded as JSON, at most 1.5 MiB (the Kubernetes/etcd habit:
/// etcd refuses values over its 1.5 MiB request limit by default).
pub const MAX_OBJECT_BYTES: usize = 3 << 19;

/// All manifests of one apply together, at most 8 MiB.
pub const MAX_APPLY_BYTES: usize = 8 << 20;

/// An image reference's name (the part before `:tag` / `@digest`), as in
/// the OCI distribution grammar.
pub const MAX_IMAGE_NAME: usize = 255;

/// An image tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub const MAX_IMAGE_TAG: usize = 128;

/// Entries in `env`, and strings in `command` and in `args`, each.
pub const MAX_LIST_ITEMS: usize = 1024;

/// One env value, argument or command word.
pub const MAX_STRING_BYTES: usize = 32 << 10;

/// `command`, `args` and `env` of one container together (Linux allows
/// 2 MiB for argv and the environment of a process; stay well inside).
pub const MAX_CONTAINER_ARGV_BYTES: usize = 256 << 10;

/// All annotations of one object together (keys and values), as in
/// Kubernetes.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;

/// How many characters of a value a message quotes.
const SHOWN_CHARS: usize = 64;

/// `s` quoted for a message, cut to its first 64 characters with `…` and
/// its length when longer, so an error about a 2 MB string stays short.
pub fn shown(s: &str) -> String {
    if s.chars().count() <= SHOWN_CHARS {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN_CHARS).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// A byte count in the unit a person reads: `11.6 MB`, `900 KB`, `12 B`
/// (decimal units, as a file manager shows them).
pub fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// A limit in binary units as the docs write it: `1.5 MiB`, `8 MiB`,
/// `256 KiB`.
pub fn human_limit(n: usize) -> String {
    let fmt = |v: f64, unit: &str| {
        if v.fract() == 0.0 {
            format!("{v:.0} {unit}")
        } else {
            format!("{v:.1} {unit}")
        }
    };
    if n >= 1 << 20 {
        fmt(n as f64 / f64::from(1u32 << 20), "MiB")
    } else if n >= 1 << 10 {
        fmt(n as f64 / f64::from(1u32 << 10), "KiB")
    } else {
        format!("{n} bytes")
    }
}

/// The message for an apply over [`MAX_APPLY_BYTES`], or `None` when
/// `total` bytes fit: `apply is 11.6 MB; the limit is 8 MiB: split it`.
pub fn apply_too_large(total: usize) -> Option<String> {
    (total > MAX_APPLY_BYTES).then(|| {
        format!(
            "apply is {}; the limit is {}: split it into several applies",
            human_bytes(total),
            human_limit(MAX_APPLY_BYTES)
        )
    })
}

/// Why `image` breaks the reference grammar's limits, if it does: the
/// name at most 255 characters, a tag at most 128 of
/// `[A-Za-z0-9_.-]` not starting with `.` or `-`, a digest
/// `algorithm:hex`.
pub fn image_reference_problem(image: &str) -> Option<String> {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    // A ':' after the last '/' starts the tag (an earlier one is a port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if name.is_empty() {
        return Some(format!(
            "has no name before the tag or digest: {}",
            shown(image)
        ));
    }
    if name.len() > MAX_IMAGE_NAME {
        return Some(format!(
            "the name must be at most {MAX_IMAGE_NAME} characters, got {} ({})",
            name.len(),
            shown(name)
        ));
    }
    if let Some(t) = tag {
        if t.len() > MAX_IMAGE_TAG {
            return Some(format!(
                "the tag must be at most {MAX_IMAGE_TAG} characters, got {} ({})",
                t.len(),
                shown(t)
            ));
        }
        let ok = t
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Some(format!(
                "the tag must be 1-{MAX_IMAGE_TAG} of letters, digits, '_', '.' and '-', not starting with '.' or '-', got {}",
                shown(t)
            ));
        }
    }
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg.len() <= 32
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && (32..=128).contains(&hex.len())
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if !ok {
            return Some(format!(
                "the digest must be algorithm:hex such as sha256:<64 hex digits>, got {}",
                shown(d)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_cuts_long_values() {
        assert_eq!(shown("web"), "\"web\"");
        let long = "x".repeat(2_000_000);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.ends_with("… (2000000 bytes)"), "{s}");
    }

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(human_bytes(11_599_083), "11.6 MB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_limit(MAX_APPLY_BYTES), "8 MiB");
        assert_eq!(human_limit(MAX_OBJECT_BYTES), "1.5 MiB");
        assert_eq!(human_limit(MAX_ANNOTATIONS_BYTES), "256 KiB");
        assert_eq!(
            apply_too_large(11_599_083).as_deref(),
            Some("apply is 11.6 MB; the limit is 8 MiB: split it into several applies")
        );
        assert_eq!(apply_too_large(MAX_APPLY_BYTES), None);
    }

    #[test]
    fn image_references() {
        for ok in [
            "web:1",
            "registry.local/web:1.2",
            "registry.local:5000/team/web",
            "ironmesh/busybox:latest",
            &format!("web@sha256:{}", "a".repeat(64)),
            &format!("web:1@sha256:{}", "a".repeat(64)),
            &"n".repeat(255),
        ] {
            assert_eq!(image_reference_problem(ok), None, "{ok}");
        }
        let p = image_reference_problem(&"n".repeat(2_000_000)).unwrap();
        assert!(p.contains("at most 255 characters, got 2000000"), "{p}");
        assert!(p.len() < 200);
        let p = image_reference_problem(&format!("web:{}", "t".repeat(129))).unwrap();
        assert!(p.contains("tag must be at most 128"), "{p}");
        assert!(image_reference_problem("web:.x").is_some());
        assert!(image_reference_problem("web@md5").is_some());
        assert!(image_reference_problem(":1").is_some());
    }
}
