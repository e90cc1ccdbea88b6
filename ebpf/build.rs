//! Compiles every `c/*.bpf.c` with clang (`-O2 -g -target bpf`) into
//! `$OUT_DIR/<name>.bpf.o`, for the agent to embed and load with aya.
//! No programs exist yet; the datapath issue adds them.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from("c");
    println!("cargo:rerun-if-changed=c");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
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
}
