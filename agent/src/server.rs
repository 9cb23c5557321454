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

/// How long one request may take to arrive; a client that connects and
/// says nothing must not pin a thread forever.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

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
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = service.clone();
                    let metrics = metrics.clone();
                    // Each request gets its own OS thread: it blocks on
                    // netlink and spawns netns threads of its own.
                    let spawned = stream.into_std().and_then(|s| {
                        s.set_nonblocking(false)?;
                        std::thread::Builder::new()
                            .name("railnet-request".into())
                            .spawn(move || handle(s, &service, &metrics))
                    });
                    if let Err(e) = spawned {
                        warn!(error = %e, "cannot serve a connection");
                    }
                }
                Err(e) => warn!(error = %e, "accept failed"),
            }
        }
    }
    let _ = fs::remove_file(&path);
    info!(socket = %path.display(), "stopped serving");
}

fn handle(mut stream: UnixStream, service: &RailService, metrics: &crate::metrics::Metrics) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let response = match api::recv::<Request>(&mut stream) {
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
    };
    metrics.observe(op, result.is_ok(), started.elapsed().as_secs_f64());
    match result {
        Ok(result) => {
            tracing::debug!(op, attachment = %who, elapsed_us = started.elapsed().as_micros() as u64, "done");
            Response::Ok {
                api: API_VERSION,
                result,
                ipam,
            }
        }
        Err(e) => {
            warn!(op, attachment = %who, error = %e, "failed");
            Response::Error(e)
        }
    }
}
