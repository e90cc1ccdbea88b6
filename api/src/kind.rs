//! The resource kinds and the names operators may use for them.

/// A resource kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Workload,
    Service,
    Policy,
    Volume,
    Pipeline,
    PipelineRun,
    Source,
    Gateway,
    HTTPRoute,
    /// Sealed values (a listener's certificate and key); admin only.
    Secret,
    /// One placed copy of a Workload; created and deleted by the controller.
    Instance,
}

/// A kind name that matches no kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}; expected one of Node, Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source, Gateway, HTTPRoute, Secret, Instance")]
pub struct UnknownKind(pub String);

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Node,
        Kind::Workload,
        Kind::Service,
        Kind::Policy,
        Kind::Volume,
        Kind::Pipeline,
        Kind::PipelineRun,
        Kind::Source,
        Kind::Gateway,
        Kind::HTTPRoute,
        Kind::Secret,
        Kind::Instance,
    ];

    /// The `kind:` value, e.g. "PipelineRun".
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::Policy => "Policy",
            Kind::Volume => "Volume",
            Kind::Pipeline => "Pipeline",
            Kind::PipelineRun => "PipelineRun",
            Kind::Source => "Source",
            Kind::Gateway => "Gateway",
            Kind::HTTPRoute => "HTTPRoute",
            Kind::Secret => "Secret",
            Kind::Instance => "Instance",
        }
    }

    /// Lowercase plural, as in `imctl get nodes`.
    pub fn plural(&self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Workload => "workloads",
            Kind::Service => "services",
            Kind::Policy => "policies",
            Kind::Volume => "volumes",
            Kind::Pipeline => "pipelines",
            Kind::PipelineRun => "pipelineruns",
            Kind::Source => "sources",
            Kind::Gateway => "gateways",
            Kind::HTTPRoute => "httproutes",
            Kind::Secret => "secrets",
            Kind::Instance => "instances",
        }
    }

    fn short(&self) -> &'static [&'static str] {
        match self {
            Kind::Node => &["no"],
            Kind::Workload => &["wl"],
            Kind::Service => &["svc"],
            Kind::Policy => &["pol"],
            Kind::Volume => &["vol"],
            Kind::Pipeline => &["pl"],
            Kind::PipelineRun => &["plr", "run", "runs"],
            Kind::Source => &["src"],
            Kind::Gateway => &["gw"],
            Kind::HTTPRoute => &["route", "routes"],
            Kind::Secret => &["secret"],
            Kind::Instance => &["inst"],
        }
    }

    /// Case-insensitive: the kind name, its plural, or a short name.
    pub fn parse(s: &str) -> Result<Kind, UnknownKind> {
        let l = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| {
                k.as_str().eq_ignore_ascii_case(&l)
                    || k.plural() == l
                    || k.short().contains(&l.as_str())
            })
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

impl Kind {
    /// Kinds only the system creates: operators may read and delete them but
    /// not apply them.
    pub fn is_system_managed(&self) -> bool {
        matches!(self, Kind::Instance)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_plurals() {
        let names: Vec<&str> = Kind::ALL.iter().map(Kind::as_str).collect();
        assert_eq!(
            names,
            [
                "Node",
                "Workload",
                "Service",
                "Policy",
                "Volume",
                "Pipeline",
                "PipelineRun",
                "Source",
                "Gateway",
                "HTTPRoute",
                "Secret",
                "Instance"
            ]
        );
        assert_eq!(Kind::PipelineRun.plural(), "pipelineruns");
        assert_eq!(Kind::Policy.plural(), "policies");
        assert_eq!(Kind::Node.to_string(), "Node");
    }

    #[test]
    fn parses_names_plurals_and_short_names() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Ok(k));
            assert_eq!(Kind::parse(k.plural()), Ok(k));
            assert_eq!(Kind::parse(&k.as_str().to_uppercase()), Ok(k));
            assert_eq!(Kind::parse(&k.as_str().to_lowercase()), Ok(k));
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        }
        for (s, k) in [
            ("no", Kind::Node),
            ("wl", Kind::Workload),
            ("SVC", Kind::Service),
            ("pol", Kind::Policy),
            ("vol", Kind::Volume),
            ("pl", Kind::Pipeline),
            ("plr", Kind::PipelineRun),
            ("run", Kind::PipelineRun),
            ("Runs", Kind::PipelineRun),
            ("src", Kind::Source),
            ("pipelinerun", Kind::PipelineRun),
            ("Policies", Kind::Policy),
        ] {
            assert_eq!(Kind::parse(s), Ok(k), "{s}");
        }
    }

    #[test]
    fn unknown_kind_lists_the_valid_ones() {
        let e = Kind::parse("Deployment").unwrap_err();
        assert_eq!(e, UnknownKind("Deployment".into()));
        assert_eq!(
            e.to_string(),
            "unknown kind \"Deployment\"; expected one of Node, Workload, Service, Policy, Volume, Pipeline, PipelineRun, Source, Gateway, HTTPRoute, Secret, Instance"
        );
        assert!(Kind::parse("").is_err());
        assert!("nodez".parse::<Kind>().is_err());
    }
}
