//! Equality label selectors: `app=web,tier!=db,team` (key exists).

use std::collections::BTreeMap;

use crate::validate::ValidationError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
}

/// A parsed selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Term>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, ValidationError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let term = if let Some((k, v)) = part.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else {
                Term::Exists(part.into())
            };
            let key = match &term {
                Term::Eq(k, _) | Term::Ne(k, _) | Term::Exists(k) => k,
            };
            if let Some(p) = crate::meta::label_key_problem(key) {
                return Err(ValidationError {
                    kind: None,
                    name: None,
                    path: format!("selector {part:?}"),
                    message: p,
                });
            }
            terms.push(term);
        }
        Ok(LabelSelector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let l: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(LabelSelector::parse("").unwrap().matches(&l));
        assert!(LabelSelector::parse("app=web").unwrap().matches(&l));
        assert!(LabelSelector::parse("app=web,tier!=db")
            .unwrap()
            .matches(&l));
        assert!(!LabelSelector::parse("app=db").unwrap().matches(&l));
        assert!(LabelSelector::parse("tier").unwrap().matches(&l));
        assert!(!LabelSelector::parse("team").unwrap().matches(&l));
        assert!(LabelSelector::parse("bad key=x").is_err());
    }
}
