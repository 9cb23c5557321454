//! The rail programs' log: the rare events an operator must see (a packet
//! left to the main table because it would not fit its rail's MTU, a rail
//! whose interface is gone), forwarded to the agent's `tracing` output with
//! the pod and the rail.
//!
//! The pods' programs do not log themselves: on a rare branch they leave
//! the event in the packet's `cb` and tail-call `rail_say`, one program per
//! node, loaded here once and kept in a pinned program array ([`say_pin`])
//! every pod's program references — so aya-log's record code is verified
//! once per node, not at every pod's ADD (it tripled the verifier's work on
//! the pod's first rail). `rail_say` writes into aya-log's ring buffer
//! `AYA_LOGS`, pinned once per node at [`pin_path`]: not one buffer and one
//! reader per pod. Both pins outlive an agent restart; the next agent opens
//! the same buffer and reads on, and puts its own `rail_say` in the array.
//! The pins are files directly under the pin root, where the pod sweep,
//! which looks only at directories, never takes them for pods.
//!
//! Nothing here runs on the packet path: the program says something only on
//! its rare branches, and the agent reads when the ring buffer says it has
//! records (epoll on its fd), not on a timer.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{EbpfLoader, maps::ProgramArray, programs::SchedClassifier};
use aya_log::EbpfLogger;
use railnet_common::{MAP_SAY, PROGRAM_RAIL_SAY};
use tokio::io::{Interest, unix::AsyncFd};

use super::{DataplaneError, pinned_pods};
use crate::bpf_object;

/// aya-log's ring buffer in the program's object.
pub const MAP_LOGS: &str = "AYA_LOGS";

/// A repeated event (same pod, rail and kind) is said once per this long;
/// the next line says how many were not.
const QUIET: Duration = Duration::from_secs(10);

/// Where the node's one log buffer is pinned.
pub fn pin_path(pin_root: &Path) -> PathBuf {
    pin_root.join("program-log")
}

/// Where the program array holding this agent's `rail_say` is pinned: one
/// per program object (`say-<id>`, as the pods' program pins), so after an
/// upgrade the pods an older agent wired keep the array their programs
/// reference, with the `rail_say` that agent loaded.
pub fn say_pin(pin_root: &Path, object: &'static [u8]) -> PathBuf {
    let id = super::program_pin(object).trim_start_matches("prog-");
    pin_root.join(format!("say-{id}"))
}

/// Removes the log buffer's pin and every `rail_say` array's (the node's
/// share of an uninstall, when no pod is left to write into them). `Ok` if
/// they were not there.
pub fn unpin(pin_root: &Path) -> std::io::Result<()> {
    let mut pins = vec![pin_path(pin_root)];
    if let Ok(entries) = std::fs::read_dir(pin_root) {
        pins.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("say-"))
                .map(|e| e.path()),
        );
    }
    for pin in pins {
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Opens (creating and pinning them if this is the node's first agent) the
/// log buffer and the `rail_say` array every pod's program uses, loads
/// `rail_say` into the array, and returns the buffer's reader, reading into
/// [`Forward`].
pub fn open(pin_root: &Path) -> Result<EbpfLogger<Forward>, DataplaneError> {
    let object = bpf_object::object()?;
    // Creates the object's maps (the per-pod ones unpinned here: they go
    // when `ebpf` does) and loads only `rail_say`.
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(MAP_LOGS, pin_path(pin_root))
        .map_pin_path(MAP_SAY, say_pin(pin_root, object))
        .load(object)
        .map_err(|e| DataplaneError::Load(format!("the program log buffer: {e:#}")))?;
    let say: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM_RAIL_SAY)
        .ok_or_else(|| DataplaneError::Load(format!("{PROGRAM_RAIL_SAY} is not in the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    say.load()
        .map_err(|e| DataplaneError::Load(format!("{PROGRAM_RAIL_SAY}: verifier: {e:#}")))?;
    let fd = say
        .fd()
        .map_err(|e| DataplaneError::Load(e.to_string()))?
        .try_clone()
        .map_err(|e| DataplaneError::Load(e.to_string()))?;
    let mut array = ProgramArray::try_from(
        ebpf.map_mut(MAP_SAY)
            .ok_or_else(|| DataplaneError::Load(format!("{MAP_SAY} is not in the object")))?,
    )
    .map_err(|e| DataplaneError::Map {
        map: MAP_SAY,
        why: e.to_string(),
    })?;
    // The array's entry holds the program from now on (the array is
    // pinned, so the kernel keeps its entries).
    array.set(0, &fd, 0).map_err(|e| DataplaneError::Map {
        map: MAP_SAY,
        why: e.to_string(),
    })?;
    EbpfLogger::init_with_logger(&mut ebpf, Forward::new(pin_root)).map_err(|e| {
        DataplaneError::Map {
            map: MAP_LOGS,
            why: e.to_string(),
        }
    })
}

/// Reads the log buffer whenever it has records, until the task is
/// dropped. Must run inside a tokio runtime.
pub async fn forward(logger: EbpfLogger<Forward>) {
    // SAFETY: the logger owns the ring buffer's fd and neither closes nor
    // replaces it while the AsyncFd holds it (it is dropped with it).
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "the rail programs' log cannot be watched; their events are not forwarded");
            return;
        }
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the rail programs' log stopped; their events are no longer forwarded");
                return;
            }
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Turns the programs' records into `tracing` events naming the pod.
pub struct Forward {
    pin_root: PathBuf,
    state: Mutex<Said>,
}

/// What [`Forward`] remembers between records.
#[derive(Default)]
struct Said {
    /// Netns cookie → container ID, from the pods' META maps.
    pods: HashMap<u64, String>,
    /// When the pods were last listed for a cookie not known.
    listed: Option<Instant>,
    /// Last time each (cookie, rail, level) was said, and how many were
    /// not said since.
    last: HashMap<(u64, u32, log::Level), (Instant, u64)>,
}

impl Forward {
    fn new(pin_root: &Path) -> Self {
        Forward {
            pin_root: pin_root.to_path_buf(),
            state: Mutex::new(Said::default()),
        }
    }

    /// The container of the pod whose netns has `cookie`; lists the pins
    /// at most once a second for cookies it does not know.
    fn pod(&self, said: &mut Said, cookie: u64) -> Option<String> {
        if let Some(id) = said.pods.get(&cookie) {
            return Some(id.clone());
        }
        if said
            .listed
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        said.listed = Some(Instant::now());
        said.pods = pinned_pods(&self.pin_root)
            .into_iter()
            .filter_map(|p| Some((p.netns?.cookie, p.container_id)))
            .collect();
        said.pods.get(&cookie).cloned()
    }
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        let level = record.level();
        let Some(event) = Event::parse(&text) else {
            // Not one of ours in shape: say it as it came.
            emit(level, None, &text, None, 0);
            return;
        };
        let mut said = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = (event.netns_cookie, event.rail, level);
        let now = Instant::now();
        let repeated = match said.last.get_mut(&key) {
            Some((at, quiet)) if now.duration_since(*at) < QUIET => {
                *quiet += 1;
                return;
            }
            Some((at, quiet)) => {
                *at = now;
                std::mem::take(quiet)
            }
            None => {
                said.last.insert(key, (now, 0));
                0
            }
        };
        let pod = self.pod(&mut said, event.netns_cookie);
        drop(said);
        emit(level, pod.as_deref(), event.what, Some(&event), repeated);
    }

    fn flush(&self) {}
}

/// One program record: `netns <cookie> rail <K>: <what happened>`.
#[derive(Debug, PartialEq, Eq)]
struct Event<'a> {
    netns_cookie: u64,
    rail: u32,
    what: &'a str,
}

impl<'a> Event<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let rest = text.strip_prefix("netns ")?;
        let (cookie, rest) = rest.split_once(" rail ")?;
        let (rail, what) = rest.split_once(": ")?;
        Some(Event {
            netns_cookie: cookie.parse().ok()?,
            rail: rail.parse().ok()?,
            what,
        })
    }
}

/// One `tracing` event at the record's level (tracing wants the level
/// known where the event is written, hence one arm per level).
fn emit(level: log::Level, pod: Option<&str>, what: &str, event: Option<&Event>, repeated: u64) {
    let pod = pod.unwrap_or("-");
    let (cookie, rail) = event.map_or((0, 0), |e| (e.netns_cookie, e.rail));
    macro_rules! at {
        ($m:ident) => {
            tracing::$m!(
                target: "railnet::program",
                pod = %pod,
                rail,
                netns_cookie = cookie,
                repeated,
                "{what}"
            )
        };
    }
    match level {
        log::Level::Error => at!(error),
        log::Level::Warn => at!(warn),
        log::Level::Info => at!(info),
        log::Level::Debug => at!(debug),
        log::Level::Trace => at!(trace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_netns_and_rail() {
        assert_eq!(
            Event::parse("netns 4097 rail 3: a 1342-byte packet to 10.3.0.9 does not fit"),
            Some(Event {
                netns_cookie: 4097,
                rail: 3,
                what: "a 1342-byte packet to 10.3.0.9 does not fit",
            })
        );
    }

    #[test]
    fn a_record_of_another_shape_is_not_an_event() {
        for text in [
            "rail 3: no netns",
            "netns x rail 3: cookie not a number",
            "netns 1 rail: no rail",
            "netns 1 rail 3 no colon",
        ] {
            assert_eq!(Event::parse(text), None, "{text}");
        }
    }
}
