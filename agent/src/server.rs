//! The unix socket the CNI binary talks to.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::{
    api::{self, API_VERSION, ApiError, Op, Request, Response, code},
    netns::PodNetns,
    rail::RailService,
};

/// How long a whole request may take to arrive: the CNI sends it as soon
/// as it connects. A client that says nothing, or sends a byte now and
/// then, must not pin a thread (each read has no deadline of its own
/// that could be renewed a byte at a time).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Requests served at once (each on its own thread); more wait in the
/// socket's backlog until one ends. Far more than kubelet starts at once
/// on a node, far fewer threads than would hurt it.
pub const MAX_REQUESTS: usize = 128;

/// Whether a peer with these credentials may call the agent: root (the
/// runtime runs CNI plugins as root) or the agent's own user. The socket
/// is root-only (0600) too; this holds if its mode or owner is loosened,
/// e.g. by a hostPath mount that shares it with a pod.
pub(crate) fn may_call(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Binds the socket: parent directory created, stale socket replaced,
/// permissions root-only (anyone who can talk to it can rewire pods).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves until `shutdown` resolves, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    service: Arc<RailService>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    let runtime = tokio::runtime::Handle::current();
    loop {
        // A free slot before the next accept: at the cap, callers wait in
        // the backlog rather than each getting a thread.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let allowed = stream.peer_cred().map(|c| (c.uid(), may_call(c.uid())));
                    let service = service.clone();
                    let metrics = metrics.clone();
                    let runtime = runtime.clone();
                    // Each request gets its own OS thread: it blocks on
                    // netlink and spawns netns threads of its own.
                    let spawned = stream.into_std().and_then(|s| {
                        s.set_nonblocking(false)?;
                        std::thread::Builder::new()
                            .name("railnet-request".into())
                            .spawn(move || {
                                let _slot = slot;
                                crate::rtnl::one_connection(|| {
                                    handle(s, allowed, &runtime, &service, &metrics)
                                })
                            })
                    });
                    if let Err(e) = spawned {
                        warn!(error = %e, "cannot serve a connection");
                    }
                }
                Err(e) => {
                    // Out of file descriptors, most likely: not again at
                    // once (that would spin).
                    warn!(error = %e, "accept failed; again in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    if let Err(e) = fs::remove_file(&path) {
        warn!(socket = %path.display(), error = %e, "stopped serving; the socket file stays");
        return;
    }
    info!(socket = %path.display(), "stopped serving");
}

/// Serves one connection: its request must arrive whole within
/// [`REQUEST_DEADLINE`] (the socket is shut down then, ending the read),
/// and `allowed` (the peer's uid, and whether it may call) decides
/// whether it is served.
fn handle(
    mut stream: UnixStream,
    allowed: std::io::Result<(u32, bool)>,
    runtime: &tokio::runtime::Handle,
    service: &RailService,
    metrics: &crate::metrics::Metrics,
) {
    let received = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Ok(watched) = stream.try_clone() {
        let received = received.clone();
        runtime.spawn(async move {
            tokio::time::sleep(REQUEST_DEADLINE).await;
            if !received.load(std::sync::atomic::Ordering::Acquire) {
                tracing::debug!("no whole request within {REQUEST_DEADLINE:?}; closing");
                // Err: the client closed it first; nothing left to cut.
                let _ = watched.shutdown(std::net::Shutdown::Both);
            }
        });
    }
    if let Err(e) = stream.set_write_timeout(Some(REQUEST_DEADLINE)) {
        warn!(error = %e, "no write deadline on a CNI connection");
    }
    let request = api::recv::<Request>(&mut stream);
    received.store(true, std::sync::atomic::Ordering::Release);
    let refused = match allowed {
        Ok((_, true)) => None,
        Ok((uid, false)) => Some(format!("the caller runs as uid {uid}")),
        Err(e) => Some(format!("the caller's credentials cannot be read ({e})")),
    };
    if let Some(why) = refused {
        warn!(%why, "refused a request on the CNI socket");
        let response = Response::Error(ApiError::new(
            code::INVALID_ENV,
            format!("only root may call the railnet agent; {why}"),
            "the container runtime runs CNI plugins as root; nothing else should reach this socket",
        ));
        if let Err(e) = api::send(&mut stream, &response, None) {
            warn!(error = %e, "cannot tell a refused caller why");
        }
        return;
    }
    let response = match request {
        Ok((req, None)) => dispatch(req, None, service, metrics),
        Ok((req, Some(fd))) => match PodNetns::checked(fd) {
            Ok(ns) => dispatch(req, Some(ns), service, metrics),
            Err(_) => Response::Error(ApiError::new(
                code::INVALID_ENV,
                "the file descriptor sent with the request is not a network namespace",
                "the CNI sends CNI_NETNS's fd: it must name the pod's network namespace",
            )),
        },
        Err(e) => Response::Error(ApiError::new(
            code::DECODE,
            "malformed request to the railnet agent",
            e.to_string(),
        )),
    };
    if let Err(e) = api::send(&mut stream, &response, None) {
        warn!(error = %e, "cannot answer the CNI");
    }
}

#[tracing::instrument(skip_all, fields(op))]
fn dispatch(
    req: Request,
    netns: Option<PodNetns>,
    service: &RailService,
    metrics: &crate::metrics::Metrics,
) -> Response {
    if req.api != API_VERSION {
        return Response::Error(ApiError::new(
            code::API_MISMATCH,
            format!(
                "railnet CNI {} speaks agent API v{}, this agent speaks v{API_VERSION}",
                req.client, req.api
            ),
            "install the CNI binary that ships with this agent (the DaemonSet copies it on start)",
        ));
    }
    let started = std::time::Instant::now();
    let mut ipam = None;
    let mut claimed = Vec::new();
    let result = match &req.op {
        Op::Add(att) => match netns {
            Some(ns) => service.add(att, &ns).map(Some),
            None => Err(ApiError::new(
                code::INVALID_ENV,
                "ADD without a netns",
                "the CNI must pass CNI_NETNS's fd",
            )),
        },
        Op::Del(att) => service.del(att, netns.as_ref()).map(|()| None),
        Op::Check(att) => match netns {
            Some(ns) => service.check(att, &ns).map(|()| None),
            None => Err(ApiError::new(
                code::INVALID_ENV,
                "CHECK without a netns",
                "the CNI must pass CNI_NETNS's fd",
            )),
        },
        Op::Status => Ok(None),
        Op::IpamAdd(r) => service.ipam_add(r, netns.as_ref()).map(|res| {
            ipam = Some(res);
            None
        }),
        Op::IpamDel(r) => service.ipam_del(r).map(|()| None),
        Op::AddClaimed(att) => match (netns, service.dra.get()) {
            (Some(ns), Some(dra)) => {
                crate::dra::claimed::add(dra, service, att, &ns).map(|rails| {
                    claimed = rails;
                    None
                })
            }
            (None, _) => Err(ApiError::new(
                code::INVALID_ENV,
                "ADD without a netns",
                "the CNI must pass CNI_NETNS's fd",
            )),
            (_, None) => Err(no_dra()),
        },
        Op::DelClaimed(att) => match service.dra.get() {
            Some(dra) => crate::dra::claimed::del(dra, service, att, netns.as_ref()).map(|()| None),
            None => Err(no_dra()),
        },
        Op::Gc(r) => service.gc(r).map(|n| {
            if n > 0 {
                info!(network = %r.network, released = n, "GC released stale attachments");
            }
            None
        }),
    };
    let (op, who) = match &req.op {
        Op::Add(a) => ("ADD", format!("{}/{}", a.container_id, a.ifname)),
        Op::Del(a) => ("DEL", format!("{}/{}", a.container_id, a.ifname)),
        Op::Check(a) => ("CHECK", format!("{}/{}", a.container_id, a.ifname)),
        Op::Status => ("STATUS", String::new()),
        Op::IpamAdd(r) => ("IPAM ADD", format!("{}/{}", r.container_id, r.ifname)),
        Op::IpamDel(r) => ("IPAM DEL", format!("{}/{}", r.container_id, r.ifname)),
        Op::Gc(r) => ("GC", r.network.clone()),
        Op::AddClaimed(a) => ("DRA ADD", a.container_id.clone()),
        Op::DelClaimed(a) => ("DRA DEL", a.container_id.clone()),
    };
    metrics.observe(op, result.as_ref().err(), started.elapsed().as_secs_f64());
    match result {
        Ok(result) => {
            tracing::debug!(op, attachment = %who, elapsed_us = started.elapsed().as_micros() as u64, "done");
            Response::Ok {
                api: API_VERSION,
                result,
                ipam,
                rails: claimed,
            }
        }
        Err(e) => {
            warn!(op, attachment = %who, error = %e, "failed");
            Response::Error(e)
        }
    }
}

/// The DRA network called on an agent that is not a DRA driver.
fn no_dra() -> ApiError {
    ApiError::new(
        code::INVALID_CONFIG,
        "this node's railnet agent is not a DRA driver",
        "the DRA network (\"dra\": true) needs the agent started with --dra (chart: dra.enabled=true)",
    )
}
