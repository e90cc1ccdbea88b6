//! Building the image binaries as static executables.
//!
//! Images hold no libc, so their binaries are linked statically against
//! glibc (`-C target-feature=+crt-static`; `libc.a` comes with
//! `libc6-dev`). The build runs `cargo build --release` with an explicit
//! `--target` — so the flag reaches only the binaries, never build
//! scripts or proc macros, which cannot be static — and its own
//! `--target-dir`, so the ordinary build cache is never invalidated.
//! Release profile settings that make the binaries small (fat LTO, one
//! codegen unit, `panic = "abort"`, stripped symbols) are passed with
//! `--config`, and source paths are remapped to `/ironmesh` and `/cargo`
//! so the binaries do not depend on where the checkout lives.
//!
//! [`check_static`] reads an executable's ELF program headers and refuses
//! one that asks for a program interpreter (`ld-linux`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::ImageError;

/// The one target the images are built for (their config says amd64).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The binaries of this crate that go into images.
pub const IMAGE_BINARIES: [&str; 2] = ["records-server", "batch-step"];
/// This crate's package name, for `cargo build -p`.
pub const PACKAGE: &str = "ironmesh-images";

/// The workspace this crate was compiled in (the parent of its manifest
/// directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Paths of the static binaries a [`StaticBuild`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBinaries {
    pub records_server: PathBuf,
    pub batch_step: PathBuf,
}

/// A static release build of [`IMAGE_BINARIES`].
#[derive(Debug, Clone)]
pub struct StaticBuild {
    /// Where `cargo` runs (the workspace root).
    pub workspace_root: PathBuf,
    /// `--target-dir`; `target/static` under the workspace by default.
    pub target_dir: PathBuf,
    /// The cargo to run: `$CARGO` (set by `cargo run`) or `cargo`.
    pub cargo: OsString,
}

impl StaticBuild {
    /// The build of this workspace into `target/static`.
    pub fn new(workspace_root: &Path) -> Self {
        StaticBuild {
            workspace_root: workspace_root.to_path_buf(),
            target_dir: workspace_root.join("target").join("static"),
            cargo: std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")),
        }
    }

    /// The `cargo build` command, ready to run.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.workspace_root)
            .arg("build")
            .arg("--release")
            .args(["-p", PACKAGE]);
        for bin in IMAGE_BINARIES {
            cmd.args(["--bin", bin]);
        }
        cmd.args(["--target", STATIC_TARGET])
            .arg("--target-dir")
            .arg(&self.target_dir);
        for setting in [
            "profile.release.lto=\"fat\"",
            "profile.release.codegen-units=1",
            "profile.release.panic=\"abort\"",
            "profile.release.strip=\"symbols\"",
            "profile.release.debug=false",
            "profile.release.incremental=false",
        ] {
            cmd.args(["--config", setting]);
        }
        // CARGO_ENCODED_RUSTFLAGS (flags separated by 0x1f) wins over
        // RUSTFLAGS and build.rustflags and survives spaces in paths.
        let mut flags = vec![OsString::from("-Ctarget-feature=+crt-static")];
        let mut remap = |from: &Path, to: &str| {
            let mut flag = OsString::from("--remap-path-prefix=");
            flag.push(from.as_os_str());
            flag.push("=");
            flag.push(to);
            flags.push(flag);
        };
        remap(&self.workspace_root, "/ironmesh");
        if let Some(home) = cargo_home() {
            remap(&home, "/cargo");
        }
        let mut encoded = OsString::new();
        for (i, flag) in flags.iter().enumerate() {
            if i > 0 {
                encoded.push("\x1f");
            }
            encoded.push(flag);
        }
        cmd.env("CARGO_ENCODED_RUSTFLAGS", encoded)
            .env_remove("RUSTFLAGS");
        cmd
    }

    /// Where the built binary `name` lands.
    pub fn binary_path(&self, name: &str) -> PathBuf {
        self.target_dir
            .join(STATIC_TARGET)
            .join("release")
            .join(name)
    }

    /// Runs the build (cargo's output goes to this process's stderr) and
    /// checks that both binaries are static.
    pub fn run(&self) -> Result<StaticBinaries, ImageError> {
        let mut cmd = self.command();
        let status = cmd.status().map_err(|e| {
            ImageError::StaticBuild(format!(
                "could not run {}: {e}",
                Path::new(&self.cargo).display()
            ))
        })?;
        if !status.success() {
            return Err(ImageError::StaticBuild(format!(
                "`{}` failed ({status}); is the {STATIC_TARGET} target and libc6-dev (libc.a) installed?",
                describe(&cmd)
            )));
        }
        let binaries = StaticBinaries {
            records_server: self.binary_path("records-server"),
            batch_step: self.binary_path("batch-step"),
        };
        check_static(&binaries.records_server)?;
        check_static(&binaries.batch_step)?;
        Ok(binaries)
    }
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

/// The command line, for error messages.
fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

/// Checks that `path` is an x86-64 ELF executable that needs no program
/// interpreter (a static or static-pie executable).
pub fn check_static(path: &Path) -> Result<(), ImageError> {
    let data = std::fs::read(path).map_err(|e| ImageError::io("read", path, e))?;
    let not_static = |reason: &str| ImageError::NotStatic {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let u16_at = |off: usize| {
        data.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        data.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        data.get(off..off + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if data.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(not_static("not an ELF file"));
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(not_static("not a 64-bit little-endian ELF file"));
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        return Err(not_static("not an x86-64 executable"));
    }
    let truncated = || not_static("truncated ELF header");
    let phoff = u64_at(0x20).ok_or_else(truncated)?;
    let phentsize = u16_at(0x36).ok_or_else(truncated)?;
    let phnum = u16_at(0x38).ok_or_else(truncated)?;
    let phoff = usize::try_from(phoff).map_err(|_| truncated())?;
    for i in 0..usize::from(phnum) {
        let off = phoff + i * usize::from(phentsize);
        match u32_at(off) {
            Some(PT_INTERP) => {
                return Err(not_static(
                    "it names a program interpreter (dynamically linked)",
                ))
            }
            Some(_) => {}
            None => return Err(not_static("truncated program headers")),
        }
    }
    Ok(())
}
