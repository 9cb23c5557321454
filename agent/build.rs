//! Embeds the BPF object built by `cargo xtask build`, and generates the
//! kubelet's gRPC services railnet serves as a DRA driver (`proto/`,
//! compiled by protox, a protobuf compiler in Rust: no protoc to install).
//!
//! xtask builds the program for `bpfel-unknown-none` and passes its path in
//! `RAILNET_BPF_OBJECT`. Without it (plain `cargo build`, editors, clippy)
//! an empty stub is embedded instead, so the userspace crates build with
//! stable Rust and no bpf-linker; an agent built that way refuses to start.
use std::{env, fs, path::PathBuf};

fn main() {
    kubelet_services();
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

/// The DRA plugin, its device health and plugin registration services
/// (server and client: the tests dial the agent as the kubelet would).
fn kubelet_services() {
    let protos = [
        "proto/dra_v1.proto",
        "proto/dra_health_v1.proto",
        "proto/pluginregistration_v1.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("agent/proto/*.proto compile");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate the kubelet gRPC services");
}
