//! `railnetctl import spiderpool FILE…`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::Subcommand;
use railnet_agent::spiderpool;

/// Where the objects come from.
#[derive(Debug, Subcommand)]
pub enum From {
    /// SpiderIPPool and SpiderMultusConfig YAML (v2beta1; `kubectl get
    /// spiderippools,spidermultusconfigs -A -o yaml` items, or the files
    /// you applied) as RailPools and RailNetworks. Each RailPool is checked
    /// with the agent's pool rules and each RailNetwork rendered as the
    /// controller renders it; whatever fails is left out and said so.
    Spiderpool {
        /// YAML files, several documents each; `-` reads stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Runs the import; exit 1 if anything could not be mapped or read.
pub fn run(from: From) -> ExitCode {
    let From::Spiderpool { files } = from;
    let mut sources = Vec::new();
    for f in &files {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(f)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("railnetctl import: {}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        };
        match spiderpool::read(&f.display().to_string(), &text) {
            Ok(s) => sources.extend(lists_flattened(s)),
            Err(e) => {
                eprintln!("railnetctl import: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let out = spiderpool::import(&sources);
    if let Err(e) = std::io::stdout().write_all(spiderpool::to_yaml(&out.objects).as_bytes()) {
        eprintln!("railnetctl import: writing the manifests: {e}");
        return ExitCode::FAILURE;
    }
    for n in &out.notes {
        eprintln!("note: {n}");
    }
    for p in &out.problems {
        eprintln!("not imported: {p}");
    }
    eprintln!(
        "{} objects imported, {} left out",
        out.objects.len(),
        out.problems.len()
    );
    if out.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `kubectl get … -o yaml` writes a `List`: its items are the objects.
fn lists_flattened(sources: Vec<spiderpool::Source>) -> Vec<spiderpool::Source> {
    sources
        .into_iter()
        .flat_map(|s| match s.object["kind"].as_str() {
            Some("List") => s.object["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, object)| spiderpool::Source {
                    at: format!("{}, item {}", s.at, i + 1),
                    object,
                })
                .collect(),
            _ => vec![s],
        })
        .collect()
}
