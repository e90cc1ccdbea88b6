//! Image names and tags: the Docker reference grammar
//! (`[registry[:port]/]path[:tag]`, no digest) that the controller's store,
//! its registry, `imctl image push` and `images/` all check the same way.

/// Longest image reference accepted (the Docker distribution limit).
pub const MAX_NAME: usize = 255;
/// Longest tag.
pub const MAX_TAG: usize = 128;

/// Why a name or tag was refused; the message says which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("tag {0:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}} (no ':' or '/' in a tag)")]
    Tag(String),
    #[error(
        "image name {name:?} is not a valid reference ({why}); \
         expected e.g. \"ironmesh.dev/records-server:0.1.0\""
    )]
    Name { name: String, why: &'static str },
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), NameError> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok
        || tag.len() > MAX_TAG
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(NameError::Tag(tag.to_string()));
    }
    Ok(())
}

/// One path component of a repository: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    host_ok && port_ok
}

/// Splits a name at its tag: (`path`, `Some(tag)`) or (`name`, `None`).
/// A `:` before the last `/` is a registry port, not a tag.
pub fn split_tag(name: &str) -> (&str, Option<&str>) {
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    }
}

/// Checks an image reference and returns it with `:latest` added when it
/// has no tag.
pub fn normalize_name(name: &str) -> Result<String, NameError> {
    let bad = |why: &'static str| {
        Err(NameError::Name {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 255 characters");
    }
    if name.contains('@') {
        return bad("a digest is not a name; give a tag");
    }
    let (path, tag) = split_tag(name);
    if tag.is_some_and(|t| check_tag(t).is_err()) {
        return bad("the tag must be letters, digits, '_', '.' or '-', at most 128");
    }
    let mut components: Vec<&str> = path.split('/').collect();
    if components.len() > 1 {
        let first = components[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            if !is_domain(first) {
                return bad("the registry part must be a host name with an optional port");
            }
            components.remove(0);
        }
    }
    if !components.iter().all(|c| is_path_component(c)) {
        return bad("path components must be lowercase letters and digits, \
             joined by '.', '_', '__' or dashes");
    }
    Ok(match tag {
        Some(_) => name.to_string(),
        None => format!("{name}:latest"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn names_normalize_and_tags_are_checked() {
        for (ok, norm) in [
            ("ironmesh/app", "ironmesh/app:latest"),
            (
                "ironmesh.dev/records-server:0.1.0",
                "ironmesh.dev/records-server:0.1.0",
            ),
            ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
            ("a__b/c-d:_x.1", "a__b/c-d:_x.1"),
        ] {
            assert_eq!(normalize_name(ok).as_deref(), Ok(norm), "{ok}");
        }
        for bad in [
            "",
            "A/b",
            "a/b:",
            "a/b:-x",
            "a@sha256:00",
            "a//b",
            "bad host:1/a",
        ] {
            assert!(normalize_name(bad).is_err(), "{bad}");
        }
        assert_eq!(split_tag("h:5000/a/b"), ("h:5000/a/b", None));
        assert_eq!(split_tag("h:5000/a/b:1"), ("h:5000/a/b", Some("1")));
        assert!(check_tag("v1.0_rc-2").is_ok());
        assert!(check_tag(&"a".repeat(129)).is_err());
        assert!(check_tag(".x").is_err());
    }
}
