//! `build-images`: builds Ironmesh's images as OCI image layouts.
//!
//! ```text
//! build-images [--out DIR] [--tag TAG] [--target-dir DIR]
//! ```
//!
//! Builds `records-server` and `batch-step` statically (see
//! `ironmesh_images::static_build`), then writes `DIR/records-server/`
//! and `DIR/batch-step/` (default `DIR`: `target/images` in the
//! workspace) and prints each image's name, tag and manifest digest.
//! `SOURCE_DATE_EPOCH`, if set, becomes the images' timestamps.

use std::path::PathBuf;
use std::process::ExitCode;

use ironmesh_images::catalog::{self, DEFAULT_TAG};
use ironmesh_images::static_build::{workspace_root, StaticBuild};
use ironmesh_images::{build_layout, source_date_epoch, ImageSpec};

const USAGE: &str = "usage: build-images [--out DIR] [--tag TAG] [--target-dir DIR]

  --out DIR         where the layouts go (default: target/images in the workspace)
  --tag TAG         image tag (default: dev)
  --target-dir DIR  cargo target dir of the static build (default: target/static)";

struct Args {
    out: PathBuf,
    tag: String,
    target_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        out: workspace_root().join("target").join("images"),
        tag: DEFAULT_TAG.to_string(),
        target_dir: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy().into_owned();
        let mut value = |flag: &str| {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--tag" => {
                args.tag = value("--tag")?
                    .into_string()
                    .map_err(|_| "--tag: not valid UTF-8".to_string())?
            }
            "--target-dir" => args.target_dir = Some(PathBuf::from(value("--target-dir")?)),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("build-images: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("build-images: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), ironmesh_images::ImageError> {
    let epoch = source_date_epoch()?;
    let mut build = StaticBuild::new(&workspace_root());
    if let Some(dir) = &args.target_dir {
        build.target_dir = dir.clone();
    }
    eprintln!(
        "build-images: building static binaries into {}",
        build.target_dir.display()
    );
    let binaries = build.run()?;

    let specs: [(&str, ImageSpec); 2] = [
        (
            "records-server",
            catalog::records_server(&binaries.records_server, &args.tag),
        ),
        (
            "batch-step",
            catalog::batch_step(&binaries.batch_step, &args.tag),
        ),
    ];
    println!(
        "{:<24} {:<8} {:<72} {:>10}  LAYOUT",
        "NAME", "TAG", "MANIFEST", "SIZE"
    );
    for (dir, mut spec) in specs {
        spec.epoch = epoch;
        let out = args.out.join(dir);
        let built = build_layout(&spec, &out)?;
        println!(
            "{:<24} {:<8} {:<72} {:>10}  {}",
            spec.name,
            spec.tag,
            built.manifest_digest,
            built.size,
            out.display()
        );
    }
    Ok(())
}
