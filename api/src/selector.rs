//! Label selectors as operators type them (`imctl get workloads -l ...`):
//! comma-separated terms, all of which must hold.
//!
//! | term | matches when |
//! | --- | --- |
//! | `app=web` or `app==web` | label `app` is `web` |
//! | `app!=web` | label `app` is absent or not `web` |
//! | `app` | label `app` exists |
//! | `!app` | label `app` is absent |
//! | `env in (prod,staging)` | label `env` is one of the values |
//! | `env notin (dev)` | label `env` is absent or none of the values |
//!
//! The empty selector matches everything. Selectors inside manifests
//! (Service, Policy) are plain maps; [`LabelSelector::from_map`] turns one
//! into a selector.

use std::collections::BTreeMap;

use crate::meta::{label_key_problem, label_value_problem};
use crate::validate::ValidationError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Term {
    fn key(&self) -> &str {
        match self {
            Term::Eq(k, _)
            | Term::Ne(k, _)
            | Term::Exists(k)
            | Term::Absent(k)
            | Term::In(k, _)
            | Term::NotIn(k, _) => k,
        }
    }

    fn values(&self) -> Vec<&str> {
        match self {
            Term::Eq(_, v) | Term::Ne(_, v) => vec![v.as_str()],
            Term::In(_, vs) | Term::NotIn(_, vs) => vs.iter().map(String::as_str).collect(),
            Term::Exists(_) | Term::Absent(_) => Vec::new(),
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
        }
    }
}

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Term::Eq(k, v) => write!(f, "{k}={v}"),
            Term::Ne(k, v) => write!(f, "{k}!={v}"),
            Term::Exists(k) => write!(f, "{k}"),
            Term::Absent(k) => write!(f, "!{k}"),
            Term::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Term::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
        }
    }
}

/// A parsed selector; the empty one matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Term>);

fn selector_error(term: &str, message: impl std::fmt::Display) -> ValidationError {
    ValidationError {
        kind: None,
        name: None,
        path: String::new(),
        message: format!("term {term:?}: {message}"),
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, ValidationError> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(selector_error(s, "unbalanced ')'"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(selector_error(s, "unbalanced '('"));
    }
    out.push(&s[start..]);
    Ok(out)
}

/// `(a, b)` → `["a", "b"]`.
fn value_set(part: &str, rest: &str) -> Result<Vec<String>, ValidationError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| selector_error(part, "expected a parenthesised list such as (a,b)"))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        return Err(selector_error(part, "the value list is empty"));
    }
    Ok(values)
}

fn parse_term(part: &str) -> Result<Term, ValidationError> {
    let words: Vec<&str> = part.split_whitespace().collect();
    let term = if let Some((k, v)) = part.split_once("!=") {
        Term::Ne(k.trim().into(), v.trim().into())
    } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        Term::Eq(k.trim().into(), v.trim().into())
    } else if let (Some(key), Some(op @ ("in" | "notin"))) =
        (words.first().copied(), words.get(1).copied())
    {
        // The text after the operator: `(a, b)`.
        let rest = part
            .strip_prefix(key)
            .map(str::trim_start)
            .and_then(|r| r.strip_prefix(op))
            .unwrap_or_default();
        let values = value_set(part, rest)?;
        if op == "in" {
            Term::In(key.to_string(), values)
        } else {
            Term::NotIn(key.to_string(), values)
        }
    } else if let Some(k) = part.strip_prefix('!') {
        Term::Absent(k.trim().into())
    } else {
        Term::Exists(part.into())
    };
    if let Some(p) = label_key_problem(term.key()) {
        return Err(selector_error(part, p));
    }
    for v in term.values() {
        if let Some(p) = label_value_problem(v) {
            return Err(selector_error(part, p));
        }
    }
    Ok(term)
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f,g in (x,y),h notin (z)`; whitespace around
    /// terms is ignored and the empty string is the empty selector. The
    /// error names the offending term.
    pub fn parse(s: &str) -> Result<LabelSelector, ValidationError> {
        let mut terms = Vec::new();
        for part in split_terms(s)?.into_iter().map(str::trim) {
            if part.is_empty() {
                continue;
            }
            terms.push(parse_term(part)?);
        }
        Ok(LabelSelector(terms))
    }

    /// The selector requiring every `key=value` of a map (the form
    /// manifests use, e.g. a Service's `selector`).
    pub fn from_map(m: &BTreeMap<String, String>) -> LabelSelector {
        LabelSelector(
            m.iter()
                .map(|(k, v)| Term::Eq(k.clone(), v.clone()))
                .collect(),
        )
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| t.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for LabelSelector {
    /// The canonical text form, which [`LabelSelector::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LabelSelector {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LabelSelector::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap()
    }

    #[test]
    fn empty_matches_everything() {
        assert!(sel("").is_empty());
        assert!(sel(" , ").is_empty());
        assert!(sel("").matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn equality_and_existence() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(sel("app=web").matches(&l));
        assert!(sel("app==web").matches(&l));
        assert!(sel(" app = web , tier!=db ").matches(&l));
        assert!(!sel("app=db").matches(&l));
        assert!(!sel("app!=web").matches(&l));
        assert!(sel("missing!=x").matches(&l));
        assert!(sel("tier").matches(&l));
        assert!(!sel("team").matches(&l));
        assert!(sel("!team").matches(&l));
        assert!(!sel("!app").matches(&l));
        assert!(sel("app=web,tier=front").matches(&l));
        assert!(!sel("app=web,tier=back").matches(&l));
        assert!(!sel("app=web").is_empty());
        // An empty value matches only a label set to "".
        assert!(!sel("app=").matches(&l));
        assert!(sel("app=").matches(&labels(&[("app", "")])));
    }

    #[test]
    fn set_terms() {
        let l = labels(&[("env", "prod")]);
        assert!(sel("env in (prod, staging)").matches(&l));
        assert!(!sel("env in (dev)").matches(&l));
        assert!(sel("env notin (dev,test)").matches(&l));
        assert!(!sel("env notin (prod)").matches(&l));
        assert!(sel("other notin (prod)").matches(&l));
        assert!(!sel("other in (prod)").matches(&l));
        assert!(sel("env in (prod,staging),!debug").matches(&l));
    }

    #[test]
    fn errors_name_the_term() {
        let e = LabelSelector::parse("app=web,bad key=x").unwrap_err();
        assert_eq!(e.path, "");
        assert!(
            e.message
                .starts_with("term \"bad key=x\": key \"bad key\" is invalid"),
            "{}",
            e.message
        );
        assert!(LabelSelector::parse("=x")
            .unwrap_err()
            .message
            .contains("must not be empty"));
        assert!(LabelSelector::parse("app=bad value")
            .unwrap_err()
            .message
            .contains("value \"bad value\""));
        assert!(LabelSelector::parse("env in prod")
            .unwrap_err()
            .message
            .contains("parenthesised"));
        assert!(LabelSelector::parse("env in ()")
            .unwrap_err()
            .message
            .contains("empty"));
        assert!(LabelSelector::parse("env in (a")
            .unwrap_err()
            .message
            .contains("unbalanced"));
        assert!(LabelSelector::parse("a)")
            .unwrap_err()
            .message
            .contains("unbalanced"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "app=web",
            "app=web,tier!=db,team,!debug",
            "env in (a,b),x notin (c)",
        ] {
            let parsed = sel(s);
            assert_eq!(parsed.to_string(), s);
            assert_eq!(sel(&parsed.to_string()), parsed);
        }
        assert_eq!("app=web".parse::<LabelSelector>().unwrap(), sel("app=web"));
    }

    #[test]
    fn from_map_requires_every_pair() {
        let s = LabelSelector::from_map(&labels(&[("app", "web"), ("tier", "front")]));
        assert_eq!(s.to_string(), "app=web,tier=front");
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(LabelSelector::from_map(&BTreeMap::new()).is_empty());
    }
}
