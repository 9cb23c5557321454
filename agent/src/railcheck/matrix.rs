//! From what the probes found to a verdict per node and rail network: which
//! echoes to ask for, who is to blame for a lost one, and the matrix a
//! person reads at a glance (`-o json` for tooling).
//!
//! Blame: a rail with a fault of its own (the agent refused it, no
//! carrier, its gateway silent, an MTU unlike its peers') is reported as
//! that fault, and the echoes it loses, or that others lose to it, are not
//! held against anyone else — nor is an echo across the spine to a network
//! faulty on the sending node (the kernel sends it out of that network's
//! interface before the program steers it). A lost echo between two
//! healthy rails is reported on both ends.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::Serialize;

use super::{NodeSetup, RailState, Reach, SMALL, Target};

/// Where an echo goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Towards {
    /// The same network's address on another node (index in the setups).
    Peer(usize),
    /// Another network's gateway, through this rail's gateway and the
    /// spine (index in the plan).
    Spine(usize),
}

/// The echoes node `n` is to send, with where each goes: every other
/// node's address on each of its ready networks at the rail's MTU, and one
/// other rail's gateway across the spine.
pub fn targets(setups: &[NodeSetup], n: usize) -> Vec<(Target, Towards)> {
    let mut out = Vec::new();
    let Some(me) = setups.get(n) else {
        return out;
    };
    for (i, rail) in me.rails.iter().enumerate() {
        let RailState::Ready { mtu, .. } = rail.state else {
            continue;
        };
        for (m, peer) in setups.iter().enumerate() {
            if m == n {
                continue;
            }
            if let Some(RailState::Ready { address, .. }) = peer.rails.get(i).map(|r| &r.state) {
                out.push((
                    Target {
                        from: i,
                        to: *address,
                        size: mtu,
                    },
                    Towards::Peer(m),
                ));
            }
        }
        let count = me.rails.len();
        let across = (1..count)
            .map(|d| (i + d) % count)
            .filter(|&j| me.rails[j].rail != rail.rail)
            .find_map(|j| gateway_of(setups, j).map(|g| (j, g)));
        if let Some((j, gateway)) = across {
            out.push((
                Target {
                    from: i,
                    to: gateway,
                    size: mtu,
                },
                Towards::Spine(j),
            ));
        }
    }
    out
}

/// Network `j`'s gateway, as any node's probe was given it.
fn gateway_of(setups: &[NodeSetup], j: usize) -> Option<Ipv4Addr> {
    setups
        .iter()
        .filter_map(|s| match s.rails.get(j).map(|r| &r.state) {
            Some(RailState::Ready { gateway, .. }) => *gateway,
            _ => None,
        })
        .next()
}

/// What kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The agent could not wire the rail (e.g. no such NIC on the node).
    Setup,
    /// The rail NIC has no carrier.
    LinkDown,
    /// The rail NIC is on another rail's network.
    Miscabled,
    /// The rail's gateway does not answer.
    GatewaySilent,
    /// The rail's MTU here is not its MTU on the other nodes.
    MtuMismatch,
    /// Echoes to a peer or across the spine get no answer at any size.
    Unreachable,
    /// Full-size echoes with DF do not get through; small ones do.
    Mtu,
}

/// One fault on one node's rail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What kind.
    pub kind: Kind,
    /// A few words, for the matrix's cell.
    pub summary: String,
    /// The whole story and what to do.
    pub detail: String,
}

/// One node's rail network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// The node.
    pub node: String,
    /// The network.
    pub network: String,
    /// Its rail number.
    pub rail: u32,
    /// Why it was not probed, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Its faults; none is a pass.
    pub problems: Vec<Problem>,
}

/// The verdict: one row per node, one column per rail network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// Whether every probed rail passed.
    pub ok: bool,
    /// Row names.
    pub nodes: Vec<String>,
    /// Column names (the networks).
    pub networks: Vec<String>,
    /// Echoes sent.
    pub echoes: usize,
    /// Row by row.
    pub cells: Vec<Vec<Cell>>,
}

/// The matrix for `setups` and, per node, its targets with what each
/// found (same order as [`targets`] gave them).
pub fn verdict(setups: &[NodeSetup], reaches: &[Vec<(Target, Towards, Reach)>]) -> Matrix {
    let networks: Vec<String> = setups
        .first()
        .map(|s| s.rails.iter().map(|r| r.network.clone()).collect())
        .unwrap_or_default();
    let mut cells: Vec<Vec<Cell>> = setups
        .iter()
        .map(|s| {
            s.rails
                .iter()
                .map(|r| Cell {
                    node: s.node.clone(),
                    network: r.network.clone(),
                    rail: r.rail,
                    ..Cell::default()
                })
                .collect()
        })
        .collect();
    let usual_mtu = usual_mtus(setups, networks.len());
    for (n, setup) in setups.iter().enumerate() {
        for (i, rail) in setup.rails.iter().enumerate() {
            cells[n][i].problems = own_faults(rail, &setup.rails, usual_mtu.get(i).copied());
            if let RailState::Skipped { reason } = &rail.state {
                cells[n][i].skipped = Some(reason.clone());
            }
        }
    }
    let faulty: Vec<Vec<bool>> = cells
        .iter()
        .map(|row| row.iter().map(|c| !c.problems.is_empty()).collect())
        .collect();
    let mut echoes = 0;
    for (n, list) in reaches.iter().enumerate() {
        for (target, towards, reach) in list {
            echoes += 1;
            let i = target.from;
            if faulty.get(n).and_then(|r| r.get(i)) != Some(&false) {
                continue;
            }
            let me = &setups[n].node;
            let network = &networks[i];
            let (whom, blame_peer) = match *towards {
                Towards::Peer(m) => {
                    if faulty.get(m).and_then(|r| r.get(i)) != Some(&false) {
                        continue;
                    }
                    (format!("{} on {network}", setups[m].node), Some(m))
                }
                // The kernel sends it out of this node's own interface on
                // network j first (its subnet route), where the program
                // steers it back to rail i: a fault of j's here is j's.
                Towards::Spine(j) => {
                    if faulty.get(n).and_then(|r| r.get(j)) != Some(&false) {
                        continue;
                    }
                    (format!("{}'s gateway across the spine", networks[j]), None)
                }
            };
            let problem = match *reach {
                Reach::Answered => continue,
                Reach::Silent | Reach::Error => Problem {
                    kind: Kind::Unreachable,
                    summary: match *towards {
                        Towards::Peer(m) => format!("no {}", setups[m].node),
                        Towards::Spine(j) => format!("no {}", networks[j]),
                    },
                    detail: format!(
                        "{me} cannot reach {whom} ({}) from its {network} address at any size",
                        target.to
                    ),
                },
                Reach::SmallOnly => Problem {
                    kind: Kind::Mtu,
                    summary: format!("MTU < {}", target.size),
                    detail: format!(
                        "{}-byte packets (DF) from {me} to {whom} ({}) are lost, {SMALL}-byte ones \
                         arrive: something on the path has an MTU below the rail's {} \
                         (a switch port or router interface?)",
                        target.size, target.to, target.size
                    ),
                },
                Reach::PathMtu { mtu } => Problem {
                    kind: Kind::Mtu,
                    summary: format!("path MTU {mtu}"),
                    detail: format!(
                        "a router on the path from {me} to {whom} ({}) reports MTU {mtu}, \
                         below the rail's {}",
                        target.to, target.size
                    ),
                },
            };
            add(&mut cells[n][i], problem.clone());
            if let Some(m) = blame_peer {
                add(&mut cells[m][i], problem);
            }
        }
    }
    let ok = cells.iter().flatten().all(|c| c.problems.is_empty());
    Matrix {
        ok,
        nodes: setups.iter().map(|s| s.node.clone()).collect(),
        networks,
        echoes,
        cells,
    }
}

/// Adds `p` unless the cell already has the same finding.
fn add(cell: &mut Cell, p: Problem) {
    if !cell.problems.contains(&p) {
        cell.problems.push(p);
    }
}

/// The MTU most nodes have on each network.
fn usual_mtus(setups: &[NodeSetup], networks: usize) -> Vec<u32> {
    (0..networks)
        .map(|i| {
            let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
            for s in setups {
                if let Some(RailState::Ready { mtu, .. }) = s.rails.get(i).map(|r| &r.state) {
                    *counts.entry(*mtu).or_default() += 1;
                }
            }
            counts
                .into_iter()
                .max_by_key(|&(mtu, count)| (count, mtu))
                .map_or(0, |(mtu, _)| mtu)
        })
        .collect()
}

/// A rail's faults that are its own, seen from its own link.
fn own_faults(
    rail: &super::RailSetup,
    all: &[super::RailSetup],
    usual_mtu: Option<u32>,
) -> Vec<Problem> {
    let nic = &rail.master;
    let mut out = Vec::new();
    match &rail.state {
        RailState::Skipped { .. } => {}
        RailState::Failed { reason } => out.push(Problem {
            kind: Kind::Setup,
            summary: if !nic.is_empty()
                && reason.contains(&format!("{nic:?}"))
                && reason.contains("not found")
            {
                format!("no {nic}")
            } else {
                "ADD failed".into()
            },
            detail: format!("the agent could not wire {}: {reason}", rail.network),
        }),
        RailState::Ready {
            gateway,
            mtu,
            carrier,
            gateway_answers,
            gateways_on_link,
            ..
        } => {
            if !carrier {
                out.push(Problem {
                    kind: Kind::LinkDown,
                    summary: "link down".into(),
                    detail: format!(
                        "{nic} has no carrier: check its cable, transceiver and switch port"
                    ),
                });
            } else if !gateway_answers {
                let gw = gateway.map(|g| g.to_string()).unwrap_or_default();
                if let Some(other) = gateways_on_link.first() {
                    let rail_of = all
                        .iter()
                        .find(|r| &r.network == other)
                        .map_or(0, |r| r.rail);
                    out.push(Problem {
                        kind: Kind::Miscabled,
                        summary: format!("cabled to {other}"),
                        detail: format!(
                            "{nic} is on {other}'s network (rail {rail_of}): its gateway answers \
                             there and {}'s ({gw}) does not; swap the cable to rail {}'s switch",
                            rail.network, rail.rail
                        ),
                    });
                } else {
                    out.push(Problem {
                        kind: Kind::GatewaySilent,
                        summary: "no gateway".into(),
                        detail: format!(
                            "{}'s gateway {gw} does not answer on {nic}: check the rail \
                             switch's interface and the pool's gateway",
                            rail.network
                        ),
                    });
                }
            }
            if let Some(usual) = usual_mtu
                && usual != *mtu
            {
                out.push(Problem {
                    kind: Kind::MtuMismatch,
                    summary: format!("MTU {mtu}≠{usual}"),
                    detail: format!(
                        "{}'s MTU is {mtu} here and {usual} on most nodes: set {nic}'s MTU \
                         (or the network's mtu) alike everywhere",
                        rail.network
                    ),
                });
            }
        }
    }
    out
}

impl Cell {
    /// What the matrix shows: ✓, `-` when not probed, else the first
    /// fault (and how many more).
    pub fn label(&self) -> String {
        match (self.problems.as_slice(), &self.skipped) {
            ([], Some(_)) => "-".into(),
            ([], None) => "✓".into(),
            ([one], _) => one.summary.clone(),
            ([first, rest @ ..], _) => format!("{} (+{})", first.summary, rest.len()),
        }
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = |s: &str| s.chars().count();
        let first = self
            .nodes
            .iter()
            .map(|n| width(n))
            .chain([4])
            .max()
            .unwrap_or(4);
        let cols: Vec<usize> = (0..self.networks.len())
            .map(|i| {
                self.cells
                    .iter()
                    .filter_map(|row| row.get(i))
                    .map(|c| width(&c.label()))
                    .chain([width(&self.networks[i])])
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        let mut header = format!("{:first$}", "node");
        for (name, w) in self.networks.iter().zip(&cols) {
            header.push_str(&format!("  {name:w$}"));
        }
        writeln!(f, "{}", header.trim_end())?;
        for (node, row) in self.nodes.iter().zip(&self.cells) {
            let mut line = format!("{node:first$}");
            for (cell, w) in row.iter().zip(&cols) {
                let label = cell.label();
                line.push_str(&format!("  {label}{}", " ".repeat(w - width(&label))));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        let mut said = false;
        for cell in self.cells.iter().flatten() {
            for p in &cell.problems {
                if !said {
                    writeln!(f)?;
                    said = true;
                }
                writeln!(f, "{} {}: {}", cell.node, cell.network, p.detail)?;
            }
        }
        for cell in self.cells.iter().flatten() {
            if let (Some(why), true) = (&cell.skipped, cell.problems.is_empty()) {
                writeln!(f, "{} {}: not probed: {why}", cell.node, cell.network)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::railcheck::RailSetup;

    fn ready(node: u8, rail: u32) -> RailSetup {
        RailSetup {
            network: format!("rail{rail}"),
            rail,
            master: format!("eth{rail}"),
            state: RailState::Ready {
                address: Ipv4Addr::new(172, 16, rail as u8, 10 + node),
                gateway: Some(Ipv4Addr::new(172, 16, rail as u8, 254)),
                mtu: 1500,
                carrier: true,
                gateway_answers: true,
                gateways_on_link: vec![],
            },
        }
    }

    fn fabric(nodes: u8, rails: u32) -> Vec<NodeSetup> {
        (0..nodes)
            .map(|n| NodeSetup {
                node: format!("node-{n}"),
                rails: (1..=rails).map(|k| ready(n, k)).collect(),
            })
            .collect()
    }

    /// Every target answered as `answer` says.
    fn run(setups: &[NodeSetup], answer: impl Fn(usize, &Target) -> Reach) -> Matrix {
        let reaches: Vec<_> = (0..setups.len())
            .map(|n| {
                targets(setups, n)
                    .into_iter()
                    .map(|(t, to)| {
                        let r = answer(n, &t);
                        (t, to, r)
                    })
                    .collect()
            })
            .collect();
        verdict(setups, &reaches)
    }

    fn labels(m: &Matrix) -> Vec<Vec<String>> {
        m.cells
            .iter()
            .map(|r| r.iter().map(Cell::label).collect())
            .collect()
    }

    #[test]
    fn every_peer_on_every_rail_and_one_gateway_across_the_spine() {
        let s = fabric(3, 2);
        let t = targets(&s, 0);
        // Two peers per rail, one spine echo per rail.
        assert_eq!(t.len(), 2 * 2 + 2);
        assert!(t.contains(&(
            Target {
                from: 0,
                to: Ipv4Addr::new(172, 16, 1, 12),
                size: 1500
            },
            Towards::Peer(2)
        )));
        assert!(t.contains(&(
            Target {
                from: 1,
                to: Ipv4Addr::new(172, 16, 1, 254),
                size: 1500
            },
            Towards::Spine(0)
        )));
    }

    #[test]
    fn a_clean_fabric_is_all_ticks() {
        let m = run(&fabric(2, 3), |_, _| Reach::Answered);
        assert!(m.ok);
        assert_eq!(labels(&m), vec![vec!["✓"; 3]; 2]);
        assert_eq!(m.echoes, 2 * (3 + 3));
    }

    #[test]
    fn a_dead_link_is_blamed_on_its_node_alone() {
        let mut s = fabric(2, 2);
        if let RailState::Ready { carrier, .. } = &mut s[0].rails[1].state {
            *carrier = false;
        }
        let dead = Ipv4Addr::new(172, 16, 2, 10);
        let m = run(&s, |n, t| {
            if (n == 0 && t.from == 1) || t.to == dead {
                Reach::Silent
            } else {
                Reach::Answered
            }
        });
        assert!(!m.ok);
        assert_eq!(
            labels(&m),
            vec![vec!["✓", "link down"], vec!["✓", "✓"]],
            "{m}"
        );
    }

    #[test]
    fn swapped_cables_name_the_rail_each_nic_is_on() {
        let mut s = fabric(2, 2);
        for (i, other) in [(0, "rail2"), (1, "rail1")] {
            if let RailState::Ready {
                gateway_answers,
                gateways_on_link,
                ..
            } = &mut s[0].rails[i].state
            {
                *gateway_answers = false;
                *gateways_on_link = vec![other.into()];
            }
        }
        let m = run(&s, |n, _| {
            if n == 0 {
                Reach::Silent
            } else {
                Reach::Answered
            }
        });
        assert_eq!(
            labels(&m),
            vec![vec!["cabled to rail2", "cabled to rail1"], vec!["✓", "✓"]]
        );
        assert!(m.to_string().contains("eth1 is on rail2's network"), "{m}");
    }

    #[test]
    fn an_mtu_below_the_rails_is_reported_on_both_ends_of_the_rail() {
        let s = fabric(2, 2);
        let m = run(&s, |n, t| {
            // The rail's switch drops big frames; rail 1's spine echo to rail
            // 2's gateway ends at the router and is not affected.
            let on_rail2 = t.from == 1 || (t.to.octets()[2] == 2 && t.to.octets()[3] != 254);
            match (on_rail2, n) {
                (true, 0) => Reach::SmallOnly,
                (true, _) => Reach::PathMtu { mtu: 1400 },
                _ => Reach::Answered,
            }
        });
        let l = labels(&m);
        assert_eq!(l[0][0], "✓");
        assert_eq!(l[1][0], "✓");
        assert!(l[0][1].starts_with("MTU < 1500"), "{m}");
        assert!(l[1][1].starts_with("MTU < 1500"), "{m}");
        assert!(
            m.to_string().contains("path MTU 1400") || m.to_string().contains("MTU 1400"),
            "{m}"
        );
    }

    #[test]
    fn a_missing_nic_is_named() {
        let mut s = fabric(2, 2);
        s[1].rails[1].state = RailState::Failed {
            reason: "master \"eth2\" not found on this node".into(),
        };
        let m = run(&s, |_, _| Reach::Answered);
        assert_eq!(labels(&m), vec![vec!["✓", "✓"], vec!["✓", "no eth2"]]);
    }

    #[test]
    fn an_odd_mtu_is_reported_where_it_is() {
        let mut s = fabric(3, 1);
        if let RailState::Ready { mtu, .. } = &mut s[2].rails[0].state {
            *mtu = 9000;
        }
        let m = run(&s, |_, _| Reach::Answered);
        assert_eq!(labels(&m)[2][0], "MTU 9000≠1500");
        assert_eq!(labels(&m)[0][0], "✓");
    }
}
