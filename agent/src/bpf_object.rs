//! The tc program's ELF object, embedded at build time (see `build.rs`).

/// The object as 8-byte aligned bytes: aya parses the ELF in place.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

static OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/railnet.bpf.o")));

/// The embedded object, or an error saying it is a stub and how to get the
/// real one.
pub fn object() -> Result<&'static [u8], StubObject> {
    if OBJECT.0.is_empty() {
        Err(StubObject)
    } else {
        Ok(&OBJECT.0)
    }
}

/// This binary was built without the BPF program.
#[derive(Debug, thiserror::Error)]
#[error(
    "this railnet-agent was built with stub BPF objects (no bpf-linker at build time); \
     build the real ones with `cargo xtask build` and use target/release/railnet-agent"
)]
pub struct StubObject;
