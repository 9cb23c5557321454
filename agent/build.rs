//! Embeds the BPF object built by `cargo xtask build`.
//!
//! xtask builds the program for `bpfel-unknown-none` and passes its path in
//! `RAILNET_BPF_OBJECT`. Without it (plain `cargo build`, editors, clippy)
//! an empty stub is embedded instead, so the userspace crates build with
//! stable Rust and no bpf-linker; an agent built that way refuses to start.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=RAILNET_BPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = out.join("railnet.bpf.o");
    match env::var_os("RAILNET_BPF_OBJECT") {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            let bytes = fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "RAILNET_BPF_OBJECT={}: {e}; run `cargo xtask build`",
                    path.display()
                )
            });
            fs::write(&target, bytes).expect("write embedded BPF object");
        }
        _ => fs::write(&target, b"").expect("write BPF stub"),
    }
}
