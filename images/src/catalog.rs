//! The images Ironmesh ships: their names and specs.
//!
//! - `ironmesh/records-server` — a data product's records over HTTP on
//!   port 8080 (`/healthz`, `/records`, `/records/{id}`);
//! - `ironmesh/batch-step` — a pipeline step: reads `STEP_INDEX`,
//!   `STEP_REPLICAS`, `STORAGE_PATH`, writes one file, exits with
//!   `EXIT_CODE` (or checks the other steps' files with `--check N`).
//!
//! Each image holds one static binary in `/bin` and a world-writable
//! `/tmp`; nothing else (no shell, no libc).

use std::collections::BTreeMap;
use std::path::Path;

use crate::spec::{ImageDir, ImageFile, ImageSpec};

pub const RECORDS_SERVER_NAME: &str = "ironmesh/records-server";
pub const BATCH_STEP_NAME: &str = "ironmesh/batch-step";
/// The tag `build-images` uses unless told otherwise.
pub const DEFAULT_TAG: &str = "dev";
/// The port the records server listens on inside its image.
pub const RECORDS_SERVER_PORT: u16 = 8080;

/// The records-server image around a (static) `binary`.
pub fn records_server(binary: &Path, tag: &str) -> ImageSpec {
    let mut spec = base(
        RECORDS_SERVER_NAME,
        tag,
        "records-server",
        binary,
        "Serves a data product's records over HTTP: /healthz, /records, /records/{id}.",
    );
    spec.env
        .push(format!("LISTEN_ADDR=0.0.0.0:{RECORDS_SERVER_PORT}"));
    spec.exposed_ports = vec![format!("{RECORDS_SERVER_PORT}/tcp")];
    spec
}

/// The batch-step image around a (static) `binary`.
pub fn batch_step(binary: &Path, tag: &str) -> ImageSpec {
    base(
        BATCH_STEP_NAME,
        tag,
        "batch-step",
        binary,
        "A pipeline step: writes $STORAGE_PATH/step-$STEP_INDEX.txt and exits with $EXIT_CODE.",
    )
}

fn base(name: &str, tag: &str, program: &str, binary: &Path, description: &str) -> ImageSpec {
    let mut spec = ImageSpec::new(name, tag);
    let path_in_image = format!("/bin/{program}");
    spec.entrypoint = vec![path_in_image.clone()];
    spec.env = vec!["PATH=/bin".to_string()];
    spec.files = vec![ImageFile {
        path_in_image,
        source: binary.to_path_buf(),
        mode: 0o755,
    }];
    spec.directories = vec![ImageDir {
        path_in_image: "/tmp".to_string(),
        mode: 0o1777,
    }];
    spec.labels = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            program.to_string(),
        ),
        (
            "org.opencontainers.image.description".to_string(),
            description.to_string(),
        ),
        (
            "org.opencontainers.image.licenses".to_string(),
            "Apache-2.0".to_string(),
        ),
        (
            "org.opencontainers.image.vendor".to_string(),
            "Ironmesh".to_string(),
        ),
        (
            "org.opencontainers.image.version".to_string(),
            tag.to_string(),
        ),
    ]);
    spec
}
