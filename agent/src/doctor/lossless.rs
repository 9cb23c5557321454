//! The guides' "lossless network" step, read back per RoCE rail NIC: which
//! priorities PFC pauses and whether the NIC trusts DSCP (the kernel's DCB
//! netlink, [`crate::dcb`]), whether ECN/DCQCN is on for them (mlx5's
//! `/sys/class/net/<netdev>/ecn/roce_{np,rp}/enable/<priority>`), and the
//! ToS RDMA-CM gives RoCE connections (its configfs,
//! `/sys/kernel/config/rdma_cm/<device>/ports/<port>/default_roce_tos`).
//! A NIC without DCB support is said so, never failed: lossless RoCE then
//! rests on the switch and the NIC's firmware.

use std::path::{Path, PathBuf};

use super::{Outcome, Report};
use crate::dcb::{DcbError, Ieee};

/// Where the values are read (the tests give a tree of their own).
#[derive(Clone, Debug)]
pub struct Sources {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// configfs (`/sys/kernel/config`).
    pub configfs: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            sys: "/sys".into(),
            configfs: "/sys/kernel/config".into(),
        }
    }
}

/// What was read for one rail NIC, as `--compare` lines it up across
/// nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lossless {
    /// Priorities PFC pauses; `None` when DCB cannot be read.
    pub pfc: Option<Vec<u8>>,
    /// DSCP → priority entries; empty: the NIC trusts PCP.
    pub dscp: Vec<(u8, u8)>,
    /// Priorities with ECN reaction point (DCQCN) on; `None`: not exposed.
    pub ecn_rp: Option<Vec<u8>>,
    /// Priorities with ECN notification point on; `None`: not exposed.
    pub ecn_np: Option<Vec<u8>>,
    /// RDMA-CM's default RoCE ToS; `None`: unset (0).
    pub roce_tos: Option<u8>,
}

/// Reads `netdev`'s (RDMA `device`/`port`) lossless settings, adding a
/// finding per item to `report`.
pub fn check(
    report: &mut Report,
    netdev: &str,
    device: &str,
    port: u32,
    dcb: Result<Ieee, DcbError>,
    src: &Sources,
) -> Lossless {
    let mut seen = Lossless::default();
    match dcb {
        Err(DcbError::Unsupported) => report.push(
            Outcome::Warn,
            format!(
                "{netdev}: no DCB support (its driver has no DCB netlink operations): PFC and DSCP trust \
                 cannot be read here, lossless RoCE rests on the switch and the NIC's firmware"
            ),
            None,
        ),
        Err(e) => report.push(Outcome::Warn, format!("{netdev}: {e}"), None),
        Ok(ieee) => {
            let pfc = ieee.pfc.map(|p| p.priorities()).unwrap_or_default();
            if pfc.is_empty() {
                report.push(
                    Outcome::Warn,
                    format!("{netdev}: PFC pauses no priority: RoCE packets are dropped under congestion"),
                    Some(format!(
                        "enable PFC on the RoCE priority, e.g. `mlnx_qos -i {netdev} --pfc 0,0,0,1,0,0,0,0` (and on the switch)"
                    )),
                );
            } else {
                report.push(
                    Outcome::Ok,
                    format!("{netdev}: PFC on priority {}", list(&pfc)),
                    None,
                );
            }
            if ieee.dscp.is_empty() {
                report.push(
                    Outcome::Warn,
                    format!(
                        "{netdev}: trusts PCP (no DSCP entries in its DCB app table): routed rails lose the priority at each hop"
                    ),
                    Some(format!("`mlnx_qos -i {netdev} --trust dscp`")),
                );
            } else {
                let paused: Vec<String> = ieee
                    .dscp
                    .iter()
                    .filter(|(_, p)| pfc.contains(p))
                    .map(|(d, p)| format!("{d}→{p}"))
                    .collect();
                if paused.is_empty() && !pfc.is_empty() {
                    report.push(
                        Outcome::Warn,
                        format!(
                            "{netdev}: trusts DSCP, but no DSCP maps to a PFC priority ({}): RoCE traffic is not paused",
                            list(&pfc)
                        ),
                        Some("map the RoCE DSCP (26 in NVIDIA's defaults) to the PFC priority".into()),
                    );
                } else {
                    report.push(
                        Outcome::Ok,
                        format!(
                            "{netdev}: trusts DSCP ({} entries; to PFC priorities: {})",
                            ieee.dscp.len(),
                            if paused.is_empty() { "-".into() } else { paused.join(", ") }
                        ),
                        None,
                    );
                }
            }
            seen.pfc = Some(pfc);
            seen.dscp = ieee.dscp;
        }
    }
    let ecn = src.sys.join("class/net").join(netdev).join("ecn");
    seen.ecn_rp = enabled_priorities(&ecn.join("roce_rp/enable"));
    seen.ecn_np = enabled_priorities(&ecn.join("roce_np/enable"));
    match (&seen.ecn_rp, &seen.ecn_np) {
        (None, None) => report.push(
            Outcome::Ok,
            format!(
                "{netdev}: ECN/DCQCN state not exposed (no {})",
                ecn.display()
            ),
            None,
        ),
        (rp, np) => {
            let rp = rp.clone().unwrap_or_default();
            let np = np.clone().unwrap_or_default();
            let want = seen.pfc.clone().filter(|p| !p.is_empty());
            let missing: Vec<u8> = want
                .iter()
                .flatten()
                .filter(|p| !rp.contains(p) || !np.contains(p))
                .copied()
                .collect();
            report.push(
                if missing.is_empty() { Outcome::Ok } else { Outcome::Warn },
                format!(
                    "{netdev}: ECN reaction point (DCQCN) on priority {}, notification point on {}",
                    list(&rp),
                    list(&np)
                ),
                (!missing.is_empty()).then(|| {
                    format!(
                        "enable both on the RoCE priority {}: echo 1 > {}/roce_rp/enable/<p> and roce_np/enable/<p>",
                        list(&missing),
                        ecn.display()
                    )
                }),
            );
        }
    }
    let tos_file = src
        .configfs
        .join("rdma_cm")
        .join(device)
        .join("ports")
        .join(port.to_string())
        .join("default_roce_tos");
    seen.roce_tos = std::fs::read_to_string(&tos_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match seen.roce_tos {
        Some(tos) => {
            let dscp = tos >> 2;
            let prio = seen.dscp.iter().find(|(d, _)| *d == dscp).map(|(_, p)| *p);
            let paused = prio.is_some_and(|p| seen.pfc.as_ref().is_some_and(|pfc| pfc.contains(&p)));
            report.push(
                if paused || seen.pfc.is_none() { Outcome::Ok } else { Outcome::Warn },
                format!(
                    "{device}/{port}: RDMA-CM RoCE ToS {tos} (DSCP {dscp}{})",
                    match prio {
                        Some(p) => format!(", priority {p}"),
                        None => String::new(),
                    }
                ),
                (!paused && seen.pfc.is_some()).then(|| {
                    "set the ToS to the DSCP that maps to the PFC priority (106: DSCP 26, ECN capable)".into()
                }),
            );
        }
        None => report.push(
            Outcome::Warn,
            format!("{device}/{port}: RDMA-CM RoCE ToS unset: connections it makes use DSCP 0"),
            Some(format!(
                "mkdir -p {0}; echo 106 > {0}/ports/{port}/default_roce_tos (NCCL: or NCCL_IB_TC=106)",
                src.configfs.join("rdma_cm").join(device).display()
            )),
        ),
    }
    seen
}

/// Priorities whose `<dir>/<p>` file reads 1; `None` when `dir` is absent.
fn enabled_priorities(dir: &Path) -> Option<Vec<u8>> {
    if !dir.is_dir() {
        return None;
    }
    Some(
        (0..8u8)
            .filter(|p| {
                std::fs::read_to_string(dir.join(p.to_string())).is_ok_and(|s| s.trim() == "1")
            })
            .collect(),
    )
}

fn list(p: &[u8]) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcb;

    fn tree() -> (PathBuf, Sources) {
        let root = std::env::temp_dir().join(format!(
            "railnet-lossless-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let src = Sources {
            sys: root.join("sys"),
            configfs: root.join("config"),
        };
        (root, src)
    }

    fn write(path: PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_nic_set_up_as_the_guides_say_passes_every_item() {
        let (root, src) = tree();
        let ecn = src.sys.join("class/net/eth1/ecn");
        for p in 0..8 {
            let on = if p == 3 { "1" } else { "0" };
            write(ecn.join(format!("roce_rp/enable/{p}")), on);
            write(ecn.join(format!("roce_np/enable/{p}")), on);
        }
        write(
            src.configfs.join("rdma_cm/mlx5_1/ports/1/default_roce_tos"),
            "106\n",
        );
        let ieee = dcb::parse_reply(&dcb::tests::mlx5_like_reply())
            .unwrap()
            .unwrap();
        let mut report = Report::default();
        let seen = check(&mut report, "eth1", "mlx5_1", 1, Ok(ieee), &src);
        let text = report.to_string();
        assert!(
            !report.findings.iter().any(|f| f.outcome != Outcome::Ok),
            "{text}"
        );
        assert!(text.contains("eth1: PFC on priority 3"), "{text}");
        assert!(
            text.contains("RoCE ToS 106 (DSCP 26, priority 3)"),
            "{text}"
        );
        assert_eq!(seen.ecn_rp, Some(vec![3]));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn each_gap_is_a_warning_with_its_fix_and_no_dcb_is_no_failure() {
        let (root, src) = tree();
        let ecn = src.sys.join("class/net/eth1/ecn");
        for p in 0..8 {
            write(ecn.join(format!("roce_rp/enable/{p}")), "0");
            write(ecn.join(format!("roce_np/enable/{p}")), "0");
        }
        let ieee = dcb::parse_reply(&dcb::tests::mlx5_like_reply())
            .unwrap()
            .unwrap();
        let mut report = Report::default();
        check(&mut report, "eth1", "mlx5_1", 1, Ok(ieee), &src);
        let text = report.to_string();
        assert!(
            text.contains("WARN  eth1: ECN reaction point (DCQCN) on priority none"),
            "{text}"
        );
        assert!(text.contains("RoCE ToS unset"), "{text}");
        assert!(!report.failed());

        let mut report = Report::default();
        let seen = check(
            &mut report,
            "veth0",
            "rxe0",
            1,
            Err(DcbError::Unsupported),
            &src,
        );
        assert!(
            report.to_string().contains("veth0: no DCB support"),
            "{report}"
        );
        assert!(!report.failed());
        assert_eq!(seen.pfc, None);
        std::fs::remove_dir_all(root).unwrap();
    }
}
