//! What makes NCCL pair each of a pod's GPUs with the rail NIC the
//! scheduler aligned it with: an NCCL topology file (`NCCL_TOPO_FILE`).
//!
//! `NCCL_IB_HCA` only filters; which NIC a GPU's traffic takes NCCL works
//! out from the PCI tree it detects, and inside a pod that tree is what
//! the node's sysfs says — two NICs on a GPU's root complex look alike,
//! and nothing says which one the claim gave this pod's GPU. The file
//! says it: every PCIe root that holds both a GPU and a rail of the pod's
//! claims becomes one PCI switch holding exactly those, under the CPU of
//! its NUMA node, so NCCL sees each GPU one bridge away from its own NIC
//! (path type PIX) and further from every other.
//!
//! The format is NCCL's own (`src/graph/xml.cc`, `ncclTopoGetXmlFromFile`,
//! format version 1): `<system version="1">` → `<cpu numaid>` → `<pci>`
//! (switches: class `0x060400`, link speed and width) → `<pci busid>` of
//! the devices. NCCL's reader is no general XML parser: no declaration,
//! double-quoted values of at most 255 bytes, at most 16 attributes, and
//! only spaces and newlines between elements. Bus IDs are what NCCL looks
//! devices up by — lower case `dddd:bb:dd.f`, as it prints a GPU's and
//! as sysfs names a NIC's — so a device NCCL finds in the file keeps the
//! place the file gives it; what the file leaves out (link speeds of the
//! devices themselves, the CPU's affinity) NCCL reads from sysfs as it
//! would without the file. Devices of the file that are not this rank's
//! (another pod's GPU never is here; a GPU of another rank of the pod is)
//! are fused or trimmed by NCCL as it does with its own files. The
//! switches' bus IDs are made up (`ffff:ff:<n>.0`, a domain no host has),
//! as cloud providers' topology files do.

use std::{collections::BTreeMap, fmt::Write};

use super::prepared::{Placement, PreparedClaim};

/// The file's name in the pod's directory (`/etc/railnet/topo.xml` in
/// the pod).
pub const FILE: &str = "topo.xml";

/// The PCI class of a PCI-to-PCI bridge (a switch port).
const BRIDGE: &str = "0x060400";
/// A 3D controller: what data-centre GPUs are.
const GPU: &str = "0x030200";
/// An Ethernet controller.
const ETHERNET: &str = "0x020000";
/// An InfiniBand controller.
const INFINIBAND: &str = "0x020700";

/// A device of the file.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Member {
    bus_id: String,
    class: &'static str,
}

/// What one PCIe root holds of a pod's claims.
#[derive(Default)]
struct Root {
    numa: Option<i64>,
    rails: Vec<Member>,
    others: Vec<Member>,
}

/// The topology file for the pod whose claims are `claims`, or `None`
/// when no PCIe root holds both one of their rails and another driver's
/// device (nothing to pair: NCCL's own detection is as good).
pub fn render(claims: &[PreparedClaim]) -> Option<String> {
    let mut roots: BTreeMap<&str, Root> = BTreeMap::new();
    for claim in claims {
        for d in &claim.devices {
            if let Some((root, bus_id)) = placed(&d.placement) {
                let entry = roots.entry(root).or_default();
                entry.numa = entry.numa.or(d.placement.numa_node);
                let class = if d.infiniband { INFINIBAND } else { ETHERNET };
                entry.rails.push(Member { bus_id, class });
            }
        }
        for p in &claim.peers {
            if let Some((root, bus_id)) = placed(&p.placement) {
                let entry = roots.entry(root).or_default();
                entry.numa = entry.numa.or(p.placement.numa_node);
                entry.others.push(Member { bus_id, class: GPU });
            }
        }
    }
    // by NUMA node → switches (members sorted, each once)
    let mut cpus: BTreeMap<i64, Vec<Vec<Member>>> = BTreeMap::new();
    for root in roots.into_values() {
        let Some(numa) = root.numa else { continue };
        if root.rails.is_empty() || root.others.is_empty() {
            continue;
        }
        let mut members = root.rails;
        members.extend(root.others);
        members.sort();
        members.dedup_by(|a, b| a.bus_id == b.bus_id);
        cpus.entry(numa).or_default().push(members);
    }
    if cpus.is_empty() {
        return None;
    }
    let mut out = String::from("<system version=\"1\">\n");
    let mut switch = 0;
    for (numa, switches) in cpus {
        let _ = writeln!(out, "  <cpu numaid=\"{numa}\">");
        for members in switches {
            let _ = writeln!(
                out,
                "    <pci busid=\"ffff:ff:{switch:02x}.0\" class=\"{BRIDGE}\" \
                 link_speed=\"16.0 GT/s PCIe\" link_width=\"16\">"
            );
            switch += 1;
            for m in members {
                let _ = writeln!(
                    out,
                    "      <pci busid=\"{}\" class=\"{}\"/>",
                    m.bus_id, m.class
                );
            }
            out.push_str("    </pci>\n");
        }
        out.push_str("  </cpu>\n");
    }
    out.push_str("</system>\n");
    Some(out)
}

/// The root and bus ID of a device placed well enough to be in the file:
/// a bus ID NCCL can match (`dddd:bb:dd.f`, made lower case) and a root.
fn placed(p: &Placement) -> Option<(&str, String)> {
    let root = p.pcie_root.as_deref()?;
    let bus_id = p.pci_bus_id.as_deref()?.to_ascii_lowercase();
    is_bus_id(&bus_id).then_some((root, bus_id))
}

/// Whether `s` is a full PCI address as NCCL prints one (`%04x:%02x:%02x.%01x`).
fn is_bus_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10].contains(&i) || c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::dra::prepared::{PeerDevice, PreparedDevice};

    fn at(root: &str, bus_id: &str, numa: i64) -> Placement {
        Placement {
            pci_bus_id: Some(bus_id.into()),
            pcie_root: Some(root.into()),
            numa_node: Some(numa),
        }
    }

    fn rail(k: u32, placement: Placement) -> PreparedDevice {
        PreparedDevice {
            request: format!("nic{k}"),
            pool: "node0/ai".into(),
            device: format!("rail{k}"),
            share_id: None,
            rail: k,
            conf: json!({}),
            placement,
            infiniband: false,
        }
    }

    fn gpu(i: u32, placement: Placement) -> PeerDevice {
        PeerDevice {
            driver: "gpu.nvidia.com".into(),
            request: format!("gpu{i}"),
            pool: "node0".into(),
            device: format!("gpu-{i}"),
            placement,
        }
    }

    fn claim(devices: Vec<PreparedDevice>, peers: Vec<PeerDevice>) -> PreparedClaim {
        PreparedClaim {
            uid: "u".into(),
            namespace: "ai".into(),
            name: "c".into(),
            pods: vec![],
            devices,
            peers,
        }
    }

    /// An element as NCCL's reader sees it: name, attributes, children.
    #[derive(Debug)]
    struct Node {
        name: String,
        attrs: Vec<(String, String)>,
        subs: Vec<Node>,
    }

    impl Node {
        fn attr(&self, key: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// What NCCL's reader makes of one `<...>`.
    enum Element {
        Open(Node),
        Single(Node),
        Close(String),
    }

    /// Reads `text` under the rules of NCCL's reader (`xmlGetNode`,
    /// `xmlGetToken`, `xmlGetValue`, `xmlLoadSub` in `src/graph/xml.cc`),
    /// failing where it fails: anything but spaces and newlines between
    /// elements, attributes not on one line, a name or value of 255 bytes
    /// or more, an unquoted value, a closing tag not matching.
    struct NcclReader<'a>(std::iter::Peekable<std::str::Chars<'a>>);

    impl NcclReader<'_> {
        fn char(&mut self) -> char {
            self.0.next().expect("NCCL: unexpected EOF")
        }

        /// `xmlGetToken`: up to `=` or a space, `>`, `/` or newline,
        /// which it returns.
        fn token(&mut self) -> (String, char) {
            let mut t = String::new();
            loop {
                let c = self.char();
                if c == '=' || [' ', '>', '/', '\n', '\r'].contains(&c) {
                    assert!(t.len() < 255, "NCCL: name {t} too long");
                    return (t, c);
                }
                t.push(c);
            }
        }

        /// `xmlGetValue`: a quoted value and the character after it.
        fn value(&mut self) -> (String, char) {
            let quote = self.char();
            assert!(
                quote == '"' || quote == '\'',
                "NCCL: expected (double) quote"
            );
            let v: String = self.0.by_ref().take_while(|c| *c != quote).collect();
            assert!(v.len() < 254, "NCCL: value {v} too long");
            (v, self.char())
        }

        /// `xmlGetNode`.
        fn element(&mut self) -> Option<Element> {
            while matches!(self.0.peek(), Some(' ' | '\n' | '\r')) {
                self.0.next();
            }
            let c = self.0.next()?;
            assert_eq!(c, '<', "NCCL: expecting '<'");
            let (name, mut c) = self.token();
            assert!(c != '=', "NCCL: unexpected value with name {name}");
            if name.is_empty() && c == '/' {
                let (name, c) = self.token();
                assert_eq!(
                    c, '>',
                    "NCCL: unexpected trailing {c} in closing tag {name}"
                );
                return Some(Element::Close(name));
            }
            let mut attrs = Vec::new();
            while c == ' ' {
                let (key, after) = self.token();
                assert_eq!(after, '=', "NCCL: attribute {key} without a value");
                let (value, after) = self.value();
                attrs.push((key, value));
                c = after;
            }
            // NCCL keeps 16 and drops the rest.
            assert!(attrs.len() <= 16, "NCCL ignores attributes past 16");
            let single = c == '/';
            if single {
                c = self.token().1;
            }
            assert_eq!(c, '>', "NCCL: expected >, got {c:?}");
            let node = Node {
                name,
                attrs,
                subs: vec![],
            };
            Some(if single {
                Element::Single(node)
            } else {
                Element::Open(node)
            })
        }

        /// `xmlLoadSub`: the elements up to `head`'s closing tag.
        fn children(&mut self, head: Option<&str>) -> Vec<Node> {
            let mut out = Vec::new();
            while let Some(e) = self.element() {
                match e {
                    Element::Close(name) => {
                        assert_eq!(Some(name.as_str()), head, "NCCL: XML mismatch");
                        return out;
                    }
                    Element::Single(node) => out.push(node),
                    Element::Open(mut node) => {
                        node.subs = self.children(Some(&node.name.clone()));
                        out.push(node);
                    }
                }
            }
            assert!(head.is_none(), "NCCL: unterminated {head:?}");
            out
        }
    }

    fn nccl_read(text: &str) -> Vec<Node> {
        NcclReader(text.chars().peekable()).children(None)
    }

    #[test]
    fn each_gpu_shares_a_switch_with_the_rails_on_its_root_only() {
        let claims = [claim(
            vec![
                rail(3, at("pci0000:5d", "0000:5E:00.0", 0)),
                rail(5, at("pci0000:9a", "0000:9b:00.0", 1)),
            ],
            vec![
                gpu(1, at("pci0000:5d", "0000:60:00.0", 0)),
                gpu(2, at("pci0000:9a", "0000:9d:00.0", 1)),
            ],
        )];
        let text = render(&claims).unwrap();
        let doc = nccl_read(&text);
        assert_eq!(doc.len(), 1);
        let system = &doc[0];
        assert_eq!(
            (system.name.as_str(), system.attr("version")),
            ("system", Some("1"))
        );
        let mut pairs = Vec::new();
        for cpu in &system.subs {
            assert_eq!(cpu.name, "cpu");
            for switch in &cpu.subs {
                assert_eq!(switch.attr("class"), Some(BRIDGE));
                let speed = switch.attr("link_speed").unwrap();
                assert!(speed.ends_with("GT/s PCIe"), "{speed}");
                let members: Vec<(&str, &str)> = switch
                    .subs
                    .iter()
                    .map(|m| (m.attr("busid").unwrap(), m.attr("class").unwrap()))
                    .collect();
                pairs.push((cpu.attr("numaid").unwrap().to_owned(), members));
            }
        }
        assert_eq!(
            pairs,
            [
                (
                    "0".into(),
                    vec![("0000:5e:00.0", ETHERNET), ("0000:60:00.0", GPU)]
                ),
                (
                    "1".into(),
                    vec![("0000:9b:00.0", ETHERNET), ("0000:9d:00.0", GPU)]
                ),
            ],
            "{text}"
        );
        assert!(!text.contains('\t'), "NCCL's reader takes no tabs");
    }

    #[test]
    fn nothing_to_pair_is_no_file() {
        // A rail with no GPU on its root, and a GPU with no rail on its.
        let lonely = claim(
            vec![rail(1, at("pci0000:3a", "0000:3b:00.0", 0))],
            vec![gpu(3, at("pci0000:c3", "0000:c6:00.0", 1))],
        );
        assert_eq!(render(&[lonely]), None);
        // Placed by halves: no root, or a bus ID NCCL could not match.
        let vague = claim(
            vec![rail(
                1,
                Placement {
                    pcie_root: None,
                    ..at("", "0000:3b:00.0", 0)
                },
            )],
            vec![gpu(0, at("pci0000:3a", "3b:00.0", 0))],
        );
        assert_eq!(render(&[vague]), None);
    }

    #[test]
    fn infiniband_rails_are_infiniband_controllers() {
        let mut ib = rail(1, at("pci0000:3a", "0000:3b:00.0", 0));
        ib.infiniband = true;
        let text = render(&[claim(
            vec![ib],
            vec![gpu(0, at("pci0000:3a", "0000:3d:00.0", 0))],
        )])
        .unwrap();
        assert!(
            text.contains(&format!("busid=\"0000:3b:00.0\" class=\"{INFINIBAND}\"")),
            "{text}"
        );
    }

    #[test]
    fn the_reader_fails_where_nccls_does() {
        // The checks above are only as good as this reader: it must refuse
        // what NCCL refuses.
        for bad in [
            "<?xml version=\"1.0\"?>\n<system version=\"1\"></system>\n",
            "<system version=\"1\">\n\t<cpu numaid=\"0\"/>\n</system>\n",
            "<system version=1></system>",
            "<system version=\"1\"><cpu numaid=\"0\"></pci></system>",
        ] {
            let r = std::panic::catch_unwind(|| nccl_read(bad));
            assert!(r.is_err(), "accepted {bad:?}");
        }
    }
}
