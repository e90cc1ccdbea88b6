//! Errors of the datapath: each names the step and the program, map,
//! interface or path involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the datapath object (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{step} program {program}: {source}")]
    Program {
        step: &'static str,
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{step} program {program} on interface {interface}: {source}")]
    Attach {
        step: &'static str,
        program: &'static str,
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{step} link {path}: {message}")]
    Link {
        step: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{step} map {map}: {source}")]
    Map {
        step: &'static str,
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} is missing from the datapath object")]
    MissingMap { map: &'static str },
    #[error("program {program} is missing from the datapath object")]
    MissingProgram { program: &'static str },
    #[error("interface {interface} not found in this network namespace: {source}")]
    Interface {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    #[error("the flow event stream was already taken")]
    FlowsTaken,
    #[error("{missing} policy rules could not be written (enforcement is applied, so the flows they would allow are denied): {source}")]
    RulesNotWritten {
        missing: usize,
        #[source]
        source: Box<DatapathError>,
    },
}

impl DatapathError {
    pub(crate) fn io(step: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatapathError::Io {
            step,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn map(step: &'static str, map: &'static str, source: aya::maps::MapError) -> Self {
        DatapathError::Map {
            step,
            map,
            source: Box::new(source),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        DatapathError::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}
