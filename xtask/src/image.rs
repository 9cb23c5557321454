//! OCI image archives without Docker: one uncompressed layer written with
//! the `tar` crate, manifest, config and index with `oci-spec`'s types, the
//! whole image layout packed as an `oci-archive` tar that `ctr images
//! import` and `skopeo copy oci-archive:…` read.
//!
//! Reproducible: entries carry no times, owners or host modes of their own,
//! and the layout is written in a fixed order, so the same files give the
//! same digests.

use std::{collections::HashMap, io::Write, path::Path};

use anyhow::{Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

/// One thing in the image's filesystem.
pub enum Entry {
    /// A directory (parents of files must be listed before them).
    Dir(&'static str),
    /// A file with its mode and bytes.
    File {
        /// Path inside the image, without a leading `/`.
        path: String,
        /// Unix permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the image, without a leading `/`.
        path: String,
        /// Where it points.
        target: String,
    },
}

/// What an image is made of.
pub struct Image {
    /// Full reference the runtime knows it by, e.g. `ghcr.io/railnet/railnet:0.1.0`.
    pub name: String,
    /// The single layer's contents, in order.
    pub entries: Vec<Entry>,
    /// The config's entrypoint.
    pub entrypoint: Vec<String>,
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

fn digest_of(data: &[u8]) -> Result<Sha256Digest> {
    sha256_hex(data)
        .parse()
        .context("a sha256 hex string is a digest")
}

/// JSON with its object keys sorted: oci-spec keeps annotations in a
/// HashMap, whose order changes from run to run.
fn canonical_json<T: serde::Serialize>(doc: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(doc)?)?)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The layer tar, deterministic.
fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(path) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Writes `image` as an OCI archive at `out` (atomically); returns the
/// manifest's digest (`sha256:…`).
pub fn write_oci_archive(image: &Image, out: &Path) -> Result<String> {
    let layer = layer(&image.entries)?;
    let layer_digest = digest_of(&layer)?;
    // Uncompressed: the layer's digest is also its diff ID.
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(vec![format!("sha256:{}", layer_digest.digest())])
        .build()?;
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(image.entrypoint.clone())
                .env(vec![
                    "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_owned(),
                ])
                .build()?,
        )
        .rootfs(rootfs)
        .build()?;
    let config = canonical_json(&config)?;
    let config_digest = digest_of(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config.len() as u64,
            config_digest.clone(),
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayer,
            layer.len() as u64,
            layer_digest.clone(),
        )])
        .build()?;
    let manifest = canonical_json(&manifest)?;
    let manifest_digest = digest_of(&manifest)?;
    let mut entry = Descriptor::new(
        MediaType::ImageManifest,
        manifest.len() as u64,
        manifest_digest.clone(),
    );
    let tag = image.name.rsplit_once(':').map_or("latest", |(_, t)| t);
    entry.set_annotations(Some(HashMap::from([
        // containerd names the imported image by this one…
        ("io.containerd.image.name".to_owned(), image.name.clone()),
        // …skopeo and the OCI layout by the tag.
        (
            "org.opencontainers.image.ref.name".to_owned(),
            tag.to_owned(),
        ),
    ])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()?;
    let index = canonical_json(&index)?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut put = |path: String, data: &[u8]| -> Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        archive.append_data(&mut h, path, data)?;
        Ok(())
    };
    put(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.as_slice(),
    )?;
    put("index.json".into(), &index)?;
    for (digest, data) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        put(format!("blobs/sha256/{}", digest.digest()), data)?;
    }
    let bytes = archive.into_inner()?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(format!("sha256:{}", manifest_digest.digest()))
}

/// A file entry read from the host.
pub fn file_from(path: &str, mode: u32, source: &Path) -> Result<Entry> {
    Ok(Entry::File {
        path: path.to_owned(),
        mode,
        data: std::fs::read(source).with_context(|| format!("reading {}", source.display()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Image {
        Image {
            name: "example.test/x:1".into(),
            entries: vec![
                Entry::Dir("bin"),
                Entry::File {
                    path: "bin/x".into(),
                    mode: 0o755,
                    data: b"hello".to_vec(),
                },
                Entry::Symlink {
                    path: "bin/y".into(),
                    target: "x".into(),
                },
            ],
            entrypoint: vec!["/bin/x".into()],
        }
    }

    #[test]
    fn same_files_same_digest_and_a_changed_file_changes_it() {
        let dir = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
        let a = write_oci_archive(&sample(), &dir.join("a.tar")).unwrap();
        let b = write_oci_archive(&sample(), &dir.join("b.tar")).unwrap();
        assert_eq!(a, b);
        // The whole archive, index included, byte for byte (many runs:
        // a map's order changes from one to the next).
        let first = sha256_hex(&std::fs::read(dir.join("a.tar")).unwrap());
        for _ in 0..20 {
            write_oci_archive(&sample(), &dir.join("b.tar")).unwrap();
            assert_eq!(
                first,
                sha256_hex(&std::fs::read(dir.join("b.tar")).unwrap())
            );
        }
        let mut changed = sample();
        changed.entries[1] = Entry::File {
            path: "bin/x".into(),
            mode: 0o755,
            data: b"hellO".to_vec(),
        };
        assert_ne!(a, write_oci_archive(&changed, &dir.join("c.tar")).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
