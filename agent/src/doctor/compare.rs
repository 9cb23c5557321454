//! `railnetctl doctor --compare`: each node's lossless settings per rail
//! NIC lined up, and what differs said rail by rail — the usual cause of
//! one slow rail (one node's NIC with PFC on another priority, DSCP trust
//! missing, ECN off, another ToS).

use std::{collections::BTreeMap, fmt};

use super::lossless::Lossless;

/// One setting that is not the same on every node that has the NIC.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// The rail NIC (netdev name).
    pub netdev: String,
    /// The setting.
    pub setting: &'static str,
    /// Node → its value, as shown.
    pub values: BTreeMap<String, String>,
}

/// What differs between `nodes` (node name, its NICs' settings); NICs a
/// node lacks are said as `missing`.
pub fn compare(nodes: &[(String, BTreeMap<String, Lossless>)]) -> Vec<Difference> {
    let netdevs: std::collections::BTreeSet<&String> =
        nodes.iter().flat_map(|(_, nics)| nics.keys()).collect();
    let mut out = Vec::new();
    for netdev in netdevs {
        let settings: [(&'static str, Show); 5] = [
            ("PFC priorities", |l| opt(&l.pfc)),
            ("DSCP map", |l| {
                if l.dscp.is_empty() {
                    "none (trusts PCP)".into()
                } else {
                    l.dscp
                        .iter()
                        .map(|(d, p)| format!("{d}→{p}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            }),
            ("ECN reaction point", |l| opt(&l.ecn_rp)),
            ("ECN notification point", |l| opt(&l.ecn_np)),
            ("RDMA-CM ToS", |l| {
                l.roce_tos.map_or("unset".into(), |t| t.to_string())
            }),
        ];
        for (setting, show) in settings {
            let values: BTreeMap<String, String> = nodes
                .iter()
                .map(|(node, nics)| {
                    (
                        node.clone(),
                        nics.get(netdev).map_or("missing".into(), show),
                    )
                })
                .collect();
            let first = values.values().next();
            if values.values().any(|v| Some(v) != first) {
                out.push(Difference {
                    netdev: netdev.clone(),
                    setting,
                    values,
                });
            }
        }
    }
    out
}

/// How a setting is shown.
type Show = fn(&Lossless) -> String;

fn opt(p: &Option<Vec<u8>>) -> String {
    match p {
        None => "unreadable".into(),
        Some(v) if v.is_empty() => "none".into(),
        Some(v) => v.iter().map(u8::to_string).collect::<Vec<_>>().join(","),
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: Vec<String> = self
            .values
            .iter()
            .map(|(node, v)| format!("{node} {v}"))
            .collect();
        write!(
            f,
            "{} {}: {}",
            self.netdev,
            self.setting,
            values.join(" | ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(pfc: &[u8], tos: Option<u8>) -> Lossless {
        Lossless {
            pfc: Some(pfc.to_vec()),
            dscp: vec![(26, 3)],
            ecn_rp: Some(vec![3]),
            ecn_np: Some(vec![3]),
            roce_tos: tos,
        }
    }

    #[test]
    fn alike_nodes_have_no_difference_and_each_odd_setting_is_named() {
        let node = |n: &str, eth2: Lossless| {
            (
                n.to_owned(),
                BTreeMap::from([("eth1".into(), nic(&[3], Some(106))), ("eth2".into(), eth2)]),
            )
        };
        let same = [
            node("a", nic(&[3], Some(106))),
            node("b", nic(&[3], Some(106))),
        ];
        assert!(compare(&same).is_empty());
        let odd = [
            node("a", nic(&[3], Some(106))),
            node("b", nic(&[], None)),
            node("c", nic(&[3], Some(106))),
        ];
        let d: Vec<String> = compare(&odd).iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            [
                "eth2 PFC priorities: a 3 | b none | c 3",
                "eth2 RDMA-CM ToS: a 106 | b unset | c 106",
            ]
        );
        let mut lacking = odd.to_vec();
        lacking[2].1.remove("eth1");
        assert!(
            compare(&lacking)
                .iter()
                .any(|d| d.to_string() == "eth1 PFC priorities: a 3 | b 3 | c missing"),
            "{:?}",
            compare(&lacking)
        );
    }
}
