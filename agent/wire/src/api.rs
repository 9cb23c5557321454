//! The request/response API between the CNI binary and the agent.
//!
//! One request per connection on a unix stream socket: a little-endian `u32`
//! length, then that many bytes of JSON. An ADD/DEL/CHECK carries the pod's
//! netns as an fd (SCM_RIGHTS) on the first bytes, so the agent needs no
//! view of the host's netns mounts. Both sides state their API version; a
//! mismatch is answered with both numbers, never guessed around.

use std::{
    io::{IoSlice, IoSliceMut, Read, Write},
    net::IpAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use ipnet::IpNet;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Version of this request/response API.
pub const API_VERSION: u32 = 1;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/railnet/agent.sock";

/// Where the CNI leaves DELs the agent could not take (agent down, e.g.
/// mid-upgrade), unless the config or `RAILNET_TOMBSTONES` says otherwise.
pub const DEFAULT_TOMBSTONES: &str = "/var/lib/railnet/tombstones";

/// The node's CNI settings (agent socket, tombstone directory), written by
/// `railnet install` beside the CNI binaries: the node decides where its
/// agent is, not a network config.
pub const NODE_SETTINGS_FILE: &str = "railnet.node.json";

/// The file a DEL tombstone of (container, ifname) lives in. Both were
/// validated as plain names.
pub fn tombstone_path(
    dir: &std::path::Path,
    container_id: &str,
    ifname: &str,
) -> std::path::PathBuf {
    dir.join(format!("{container_id}_{ifname}.json"))
}

/// Largest message either side accepts.
pub const MAX_MESSAGE: u32 = 1 << 20;

/// A CNI error code (spec section "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// railnet: no address left in the pools tried.
    pub const POOL_EXHAUSTED: u32 = 101;
    /// railnet: the kernel refused an interface, address, route or program.
    pub const DATAPLANE: u32 = 102;
    /// railnet: the client and agent speak different API versions.
    pub const API_MISMATCH: u32 = 103;
}

/// What the CNI asks for.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Request {
    /// The sender's [`API_VERSION`].
    pub api: u32,
    /// The sender's package version, quoted in mismatch errors.
    pub client: String,
    /// The operation.
    pub op: Op,
}

/// Operations.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Wire an interface; the netns fd travels with the request.
    Add(Attachment),
    /// Undo an ADD; a netns fd travels with it when the netns still exists.
    Del(Attachment),
    /// CNI CHECK: is the attachment still as ADD left it?
    Check(Attachment),
    /// Answer whether the agent is ready (CNI STATUS).
    Status,
    /// IPAM only (the `railnet-ipam` plugin another main plugin calls):
    /// allocate addresses for an interface it creates itself.
    IpamAdd(IpamRequest),
    /// IPAM only: release what `IpamAdd` gave.
    IpamDel(IpamRequest),
    /// CNI GC: release everything of `network` not in `valid`.
    Gc(GcRequest),
    /// DRA: wire every rail device the pod's prepared ResourceClaims hold
    /// (the pod is `K8S_POD_UID` of `args`); the netns fd travels with it.
    /// Answered with one result per rail.
    AddClaimed(Attachment),
    /// DRA: undo [`Op::AddClaimed`] for the container.
    DelClaimed(Attachment),
}

/// A CNI GC request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct GcRequest {
    /// The network's name.
    pub network: String,
    /// `cni.dev/valid-attachments`: (container ID, ifname) still in use.
    pub valid: Vec<(String, String)>,
}

/// An IPAM-only request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct IpamRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Pool names or wildcards per family.
    pub ippools: crate::netconf::IpPools,
    /// With `matchMasterSubnet`: the master whose addresses pick the pool.
    #[serde(default)]
    pub match_master: Option<String>,
    /// The network's name (pool network affinity, GC).
    #[serde(default)]
    pub network: String,
    /// The pod's namespace, if known (pool namespace affinity).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The pod's name and UID (`K8S_POD_NAME`, `K8S_POD_UID`), recorded in
    /// Kubernetes mode's claims. Absent from older CNI binaries.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// See `pod_name`.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Addresses the pod asked for (`runtimeConfig.ips`, which the main
    /// plugin passes on in the config it gives its IPAM plugin).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
}

/// What an IPAM-only ADD hands back.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct IpamResult {
    /// Addresses, IPv4 first.
    pub ips: Vec<ResultIp>,
    /// The pools' extra routes.
    pub routes: Vec<ResultRoute>,
}

/// One attachment of one pod to one rail network.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The network config exactly as read from stdin (CHECK's
    /// `prevResult` is read from it, and DEL reads only what it needs).
    pub netconf: serde_json::Value,
    /// The same config as the CNI parsed and checked it (ADD and CHECK);
    /// the agent checks it again as a type, never re-reading the text.
    /// Absent from what an older CNI sent or left as a tombstone: the
    /// agent then parses `netconf` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<crate::netconf::NetConf>,
    /// `CNI_ARGS` as Multus sends them (`K8S_POD_NAMESPACE`, …).
    #[serde(default)]
    pub args: std::collections::BTreeMap<String, String>,
}

/// Parses `CNI_ARGS` (`K=V;K=V`), ignoring malformed parts as libcni does
/// with `IgnoreUnknown`.
pub fn parse_cni_args(raw: &str) -> std::collections::BTreeMap<String, String> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// The agent's answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Success; ADD carries its result.
    Ok {
        /// The agent's [`API_VERSION`].
        api: u32,
        /// ADD's result; `None` for DEL and STATUS.
        result: Option<AddResult>,
        /// IPAM-only ADD's result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ipam: Option<IpamResult>,
        /// [`Op::AddClaimed`]'s results, one per rail, in interface order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rails: Vec<AddResult>,
    },
    /// Failure, in CNI error terms.
    Error(ApiError),
}

/// A CNI error as the agent reports it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct ApiError {
    /// CNI error code, see [`code`].
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// What a person needs to act.
    pub details: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The network config (or what it names on the node) is wrong.
    pub fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg, details)
    }

    /// The node refused a change (netlink, sysfs, bpffs).
    pub fn dataplane(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(code::DATAPLANE, msg, details)
    }

    /// What kind of failure this is, for the `reason` label of the
    /// agent's request metrics: one word per CNI error code (a bounded
    /// set, whatever the message says).
    pub fn metric_label(&self) -> &'static str {
        match self.code {
            code::INCOMPATIBLE_VERSION => "incompatible_version",
            code::UNSUPPORTED_FIELD => "unsupported_field",
            code::UNKNOWN_CONTAINER => "unknown_container",
            code::INVALID_ENV => "invalid_env",
            code::IO => "io",
            code::DECODE => "decode",
            code::INVALID_CONFIG => "invalid_config",
            code::TRY_AGAIN => "try_again",
            code::POOL_EXHAUSTED => "pool_exhausted",
            code::DATAPLANE => "dataplane",
            code::API_MISMATCH => "api_mismatch",
            _ => "other",
        }
    }

    /// An interface of the pod's name is in its netns already.
    pub fn interface_exists(ifname: &str) -> Self {
        Self::dataplane(
            format!("interface {ifname} already exists in the pod netns"),
            "pick another CNI_IFNAME for this network",
        )
    }
}

/// ADD's result, in CNI 1.0 shape (the CNI converts it to the asked version).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct AddResult {
    /// The pod interface.
    pub interface: ResultInterface,
    /// Its addresses: IPv4 first, then IPv6.
    pub ips: Vec<ResultIp>,
    /// Routes installed in the pod's main table for this rail.
    pub routes: Vec<ResultRoute>,
    /// The RDMA device the pod uses on this rail, if the node has RDMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RailRdma>,
}

/// The RDMA device behind a pod's rail interface.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RailRdma {
    /// RDMA device name (`mlx5_3`), what NCCL_IB_HCA names.
    pub device: String,
    /// Its port.
    pub port: u32,
    /// PCI address of the NIC or VF, when it is a PCI function.
    pub pci_address: Option<String>,
    /// Index of the RoCE GID of the pod's IPv4 address (NCCL_IB_GID_INDEX;
    /// in shared mode it differs per pod), when the kernel listed it.
    #[serde(default)]
    pub gid_index: Option<u32>,
    /// Whether the device was moved into the pod (exclusive mode) rather
    /// than shared with the node (shared mode).
    pub isolated: bool,
}

impl RailRdma {
    /// The Device Information Specification (k8snetworkplumbingwg, v1.1)
    /// record Multus copies into the pod's `network-status` annotation,
    /// where the workload reads it through the downward API.
    pub fn device_info(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "pci",
            "version": "1.1.0",
            "pci": {
                "pci-address": self.pci_address.clone().unwrap_or_default(),
                "rdma-device": self.device,
            }
        })
    }
}

/// An address in a CNI result.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ResultIp {
    /// Address with the subnet's prefix length.
    pub address: IpNet,
    /// Rail gateway, if the pool has one.
    pub gateway: Option<IpAddr>,
}

/// An interface in a CNI result.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ResultInterface {
    /// Name in the pod.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
}

/// A route in a CNI result.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ResultRoute {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
    /// Metric.
    pub priority: u32,
}

impl AddResult {
    /// The result as CNI JSON of `version` (0.3.1 and 0.4.0 carry an IP
    /// `version` field and `interface` index; 1.x drops the former).
    pub fn to_cni(&self, version: &str, sandbox: &str) -> serde_json::Value {
        Self::to_cni_many(std::slice::from_ref(self), version, sandbox)
    }

    /// Several rails' results as one CNI result: every interface, each
    /// address pointing at its own (a DRA pod's rails, wired in one ADD).
    pub fn to_cni_many(rails: &[AddResult], version: &str, sandbox: &str) -> serde_json::Value {
        let mut interfaces = Vec::new();
        let mut ips = Vec::new();
        let mut routes = Vec::new();
        for (i, rail) in rails.iter().enumerate() {
            let one = rail.cni_parts(version, sandbox, i);
            interfaces.push(one.0);
            ips.extend(one.1);
            routes.extend(one.2);
        }
        serde_json::json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
        })
    }

    /// This rail's interface, addresses (pointing at interface `index`)
    /// and routes, as CNI JSON.
    fn cni_parts(
        &self,
        version: &str,
        sandbox: &str,
        index: usize,
    ) -> (
        serde_json::Value,
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
    ) {
        use serde_json::json;
        let ips: Vec<_> = self
            .ips
            .iter()
            .map(|a| {
                let mut ip = json!({
                    "address": a.address.to_string(),
                    "interface": index,
                });
                if let Some(gw) = a.gateway {
                    ip["gateway"] = json!(gw.to_string());
                }
                if version.starts_with("0.") {
                    let family = if matches!(a.address, IpNet::V4(_)) {
                        "4"
                    } else {
                        "6"
                    };
                    ip["version"] = json!(family);
                }
                ip
            })
            .collect();
        let routes: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                if !version.starts_with("0.") {
                    v["priority"] = json!(r.priority);
                }
                v
            })
            .collect();
        let mut iface = json!({
            "name": self.interface.name,
            "mac": self.interface.mac,
            "sandbox": sandbox,
        });
        if !version.starts_with("0.") {
            iface["mtu"] = json!(self.interface.mtu);
        }
        (iface, ips, routes)
    }
}

/// Errors of the wire protocol itself.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// A message larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(u32),
    /// Bytes that are not the expected JSON.
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one message, with `fd` attached to its first bytes.
pub fn send<T: Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let header = len.to_le_bytes();
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&header)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    if sent < header.len() {
        stream.write_all(&header[sent..])?;
    }
    stream.write_all(&body)?;
    Ok(())
}

/// One request to the agent at `socket` and its answer, with `netns`
/// attached: what the CNI does for each call, and `railnetctl check` for
/// its probe's rails. Each side of the exchange waits at most `timeout`.
pub fn call(
    socket: &std::path::Path,
    op: Op,
    netns: Option<BorrowedFd<'_>>,
    timeout: std::time::Duration,
) -> Result<Response, WireError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let req = Request {
        api: API_VERSION,
        client: env!("CARGO_PKG_VERSION").into(),
        op,
    };
    send(&mut stream, &req, netns)?;
    let (resp, _) = recv::<Response>(&mut stream)?;
    Ok(resp)
}

/// Closes the descriptors of the first `SCM_RIGHTS` message in a control
/// buffer the kernel truncated (those that fitted were installed).
fn close_truncated_rights(buf: &[u8]) {
    let header = std::mem::size_of::<libc::cmsghdr>();
    if buf.len() < header {
        return;
    }
    // SAFETY: `buf` holds at least one cmsghdr, read without alignment.
    let cmsg: libc::cmsghdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    if cmsg.cmsg_level != libc::SOL_SOCKET || cmsg.cmsg_type != libc::SCM_RIGHTS {
        return;
    }
    // SAFETY: CMSG_LEN only computes a length.
    let data = unsafe { libc::CMSG_LEN(0) } as usize;
    let end = (cmsg.cmsg_len as usize).min(buf.len());
    for raw in buf.get(data..end).unwrap_or_default().chunks_exact(4) {
        let fd = RawFd::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
        // SAFETY: the kernel installed this descriptor for us; nothing
        // else knows it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Receives one message and the fd that came with it, if any.
pub fn recv<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> Result<(T, Option<OwnedFd>), WireError> {
    let mut header = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        match msg.cmsgs() {
            Ok(cmsgs) => {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        fds.extend(raw);
                    }
                }
            }
            // More fds than room for them: the kernel installed those that
            // fit (and closed the rest); nix will not read a truncated
            // buffer, so they are closed here, or each such request would
            // leak descriptors into the agent.
            Err(_) => {
                close_truncated_rights(&space);
                return Err(WireError::Io(std::io::Error::other(
                    "a request came with more file descriptors than one netns",
                )));
            }
        }
        (msg.bytes, fds)
    };
    // SAFETY: SCM_RIGHTS handed us these fds; nobody else owns them.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    stream.read_exact(&mut header[got..])?;
    let len = u32::from_le_bytes(header);
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body)?;
    // Only the first fd means anything; extra ones are closed by the drop.
    let fd = if owned.is_empty() {
        None
    } else {
        Some(owned.swap_remove(0))
    };
    Ok((msg, fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Across a rolling upgrade: what the previous CNI sent (and left as
    /// DEL tombstones) has no typed config; it still reads, and the typed
    /// one is left out of the JSON when there is none.
    #[test]
    fn an_older_cnis_attachment_reads_without_a_typed_config() {
        let old = r#"{"container_id":"c1","ifname":"net1","netconf":{"name":"rail1"},"args":{"K8S_POD_UID":"u1"}}"#;
        let att: Attachment = serde_json::from_str(old).unwrap();
        assert_eq!(att.conf, None);
        assert_eq!(att.args["K8S_POD_UID"], "u1");
        assert_eq!(serde_json::to_string(&att).unwrap(), old);
    }

    #[test]
    fn request_and_fd_cross_a_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let req = Request {
            api: API_VERSION,
            client: "test".into(),
            op: Op::Add(Attachment {
                container_id: "c1".into(),
                ifname: "net1".into(),
                netconf: serde_json::json!({"name": "rail1"}),
                conf: None,
                args: parse_cni_args("IgnoreUnknown=true;K8S_POD_NAMESPACE=default;broken"),
            }),
        };
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        send(&mut a, &req, Some(file.as_fd())).unwrap();
        let (got, fd): (Request, _) = recv(&mut b).unwrap();
        assert_eq!(got, req);
        assert!(fd.is_some(), "the netns fd must travel with the request");
        if let Op::Add(a) = got.op {
            assert_eq!(
                a.args.get("K8S_POD_NAMESPACE").map(String::as_str),
                Some("default")
            );
            assert_eq!(a.args.len(), 2, "malformed parts are skipped");
        }
    }

    /// Descriptors of this process open on `path` (other tests run in
    /// parallel threads: only this test's file is counted).
    fn open_on(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
            .count()
    }

    /// A sender passing more fds than the agent makes room for: refused,
    /// and none of them stays open in the agent.
    #[test]
    fn too_many_fds_are_refused_and_closed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let path = std::env::temp_dir().join(format!("railnet-fds-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let files: Vec<std::fs::File> = (0..8)
            .map(|_| std::fs::File::open(&path).unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&16u32.to_le_bytes())],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .unwrap();
        let err = recv::<Request>(&mut b).unwrap_err();
        assert!(err.to_string().contains("more file descriptors"), "{err}");
        assert_eq!(open_on(&path), 8, "received descriptors left open");
        drop(files);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn oversized_and_garbage_messages_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_MESSAGE + 1).to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<Request>(&mut b),
            Err(WireError::TooLarge(_))
        ));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&3u32.to_le_bytes()).unwrap();
        a.write_all(b"{x}").unwrap();
        assert!(matches!(recv::<Request>(&mut b), Err(WireError::Decode(_))));
    }

    #[test]
    fn results_follow_the_asked_version() {
        let r = AddResult {
            interface: ResultInterface {
                name: "net1".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: 1500,
            },
            ips: vec![
                ResultIp {
                    address: "172.16.11.10/24".parse().unwrap(),
                    gateway: Some("172.16.11.254".parse().unwrap()),
                },
                ResultIp {
                    address: "fd00:16:11::1/64".parse().unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![],
            rdma: None,
        };
        let old = r.to_cni("0.3.1", "/proc/1/ns/net");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        let new = r.to_cni("1.0.0", "/proc/1/ns/net");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["cniVersion"], "1.0.0");
    }
}

#[cfg(test)]
mod fuzz {
    use std::{io::Write, os::unix::net::UnixStream};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever arrives on the socket: a decoded request or an error,
        /// never a panic or a hang.
        #[test]
        fn any_bytes_on_the_socket_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            b.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
            a.write_all(&bytes).unwrap();
            drop(a);
            let _ = recv::<Request>(&mut b);
        }

        /// CNI_ARGS of any shape parse into what they say.
        #[test]
        fn cni_args_never_panic(raw in ".{0,200}") {
            let args = parse_cni_args(&raw);
            for k in args.keys() {
                prop_assert!(!k.is_empty());
            }
        }
    }
}
