//! Compiles every `c/*.bpf.c` with clang (`-O2 -g -target bpf`) into
//! `$OUT_DIR/<name>.bpf.o`, for the agent to embed and load with aya.
//!
//! Also compiles and runs `c/layout.c` with the host C compiler, writing
//! `$OUT_DIR/layout.txt` (size and offsets of every struct in
//! `c/ironmesh.h`), which the crate's tests compare with the Rust mirrors.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from("c");
    println!("cargo:rerun-if-changed=c");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    // A build script's failure is a panic; cargo always sets OUT_DIR.
    #[allow(clippy::expect_used)]
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        println!("cargo:rerun-if-changed={}", path.display());
        let obj = out.join(format!("{stem}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-Ic")
            .arg("-c")
            .arg(&path)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} (apt install clang llvm libbpf-dev): {e}")
            });
        assert!(status.success(), "clang failed on {}", path.display());
    }
    layout(&clang, &out);
}

/// Builds and runs `c/layout.c` on the host; its output goes to
/// `$OUT_DIR/layout.txt`.
fn layout(clang: &str, out: &std::path::Path) {
    let src = PathBuf::from("c/layout.c");
    if !src.exists() {
        return;
    }
    println!("cargo:rerun-if-changed={}", src.display());
    let exe = out.join("layout");
    let status = Command::new(clang)
        .args(["-Wall", "-Werror", "-I/usr/include/x86_64-linux-gnu", "-Ic"])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {clang} for c/layout.c: {e}"));
    assert!(status.success(), "clang failed on c/layout.c");
    let output = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(output.status.success(), "{} failed", exe.display());
    std::fs::write(out.join("layout.txt"), &output.stdout)
        .unwrap_or_else(|e| panic!("cannot write layout.txt: {e}"));
}
