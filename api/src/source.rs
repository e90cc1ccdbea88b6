//! Source: a git repository whose manifests the controller keeps applied.

use serde::{Deserialize, Serialize};

use crate::validate::{Errors, Spec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// A URL (https://, ssh://, git://, file://) or an absolute path.
    pub repo: String,
    #[serde(default = "main")]
    pub branch: String,
    #[serde(default = "dot")]
    pub directory: String,
    #[serde(default = "thirty")]
    pub interval_seconds: u32,
    /// Delete objects this Source created once they leave git.
    #[serde(default = "yes")]
    pub prune: bool,
}

fn main() -> String {
    "main".into()
}
fn dot() -> String {
    ".".into()
}
fn thirty() -> u32 {
    30
}
fn yes() -> bool {
    true
}

impl Spec for SourceSpec {
    fn check(&self, errs: &mut Errors) {
        let r = &self.repo;
        let url = ["https://", "http://", "ssh://", "git://", "file://"]
            .iter()
            .any(|p| r.starts_with(p));
        if r.is_empty() {
            errs.add("spec.repo", "is required");
        } else if !url && !r.starts_with('/') {
            errs.add(
                "spec.repo",
                format!(
                    "{r:?} must be a URL (https://, ssh://, git://, file://) or an absolute path"
                ),
            );
        }
        if self.branch.is_empty()
            || self.branch.contains("..")
            || self.branch.chars().any(char::is_whitespace)
        {
            errs.add(
                "spec.branch",
                format!("{:?} is not a valid branch name", self.branch),
            );
        }
        if self.directory.starts_with('/') || self.directory.split('/').any(|c| c == "..") {
            errs.add(
                "spec.directory",
                format!(
                    "{:?} must be a relative path inside the repository",
                    self.directory
                ),
            );
        }
        if self.interval_seconds < 5 {
            errs.add(
                "spec.intervalSeconds",
                format!("must be at least 5, got {}", self.interval_seconds),
            );
        }
    }
}
