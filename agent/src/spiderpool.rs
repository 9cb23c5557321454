//! `railnetctl import spiderpool`: Spiderpool's SpiderIPPool and
//! SpiderMultusConfig objects (`spiderpool.spidernet.io/v2beta1`, as the
//! AI-cluster guides write them) turned into RailPools and RailNetworks,
//! and everything that could not be mapped, with why and what to do.
//!
//! Nothing is copied on trust: each RailPool is checked with the agent's
//! own pool rules and each RailNetwork rendered as the controller renders
//! it; an object that fails is left out and said so (a range the guides
//! print past the end of its /27 would otherwise become a pool railnet
//! refuses at start).

use serde_json::{Map, Value, json};

use crate::ipam::{Pool, cluster::pool_spec_of, wildcard_match};

/// Spiderpool's API group.
const GROUP: &str = "spiderpool.spidernet.io/";
/// Spiderpool's labels grouping networks for resource injection (the
/// second is the newer, general name).
const INJECT_LABELS: [&str; 2] = [
    "cni.spidernet.io/rdma-resource-inject",
    "cni.spidernet.io/network-resource-inject",
];

/// What an import made and what it could not.
#[derive(Debug, Default)]
pub struct Import {
    /// RailPools then RailNetworks, in the order they came.
    pub objects: Vec<Value>,
    /// Objects or fields left out, each naming the object, the field and
    /// what to do. Non-empty: the import is incomplete.
    pub problems: Vec<String>,
    /// Things done that a person should know (a value normalised, a field
    /// railnet needs no equivalent of).
    pub notes: Vec<String>,
}

/// One object read from a file: where it came from (for messages) and
/// its content.
pub struct Source {
    /// `file.yaml, document 3`.
    pub at: String,
    /// The object.
    pub object: Value,
}

/// Imports every Spiderpool object of `sources`; others are noted and
/// skipped.
pub fn import(sources: &[Source]) -> Import {
    let mut out = Import::default();
    let mut pools: Vec<String> = Vec::new();
    // Every SpiderIPPool met, imported or not.
    let mut seen: Vec<String> = Vec::new();
    let mut networks = Vec::new();
    let mut rails_by_order = 0;
    for s in sources {
        let kind = s.object["kind"].as_str().unwrap_or_default();
        let api = s.object["apiVersion"].as_str().unwrap_or_default();
        let name = s.object["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{kind} {name} ({})", s.at);
        if !api.starts_with(GROUP) {
            out.notes
                .push(format!("{what}: not a Spiderpool object; skipped"));
            continue;
        }
        match kind {
            "SpiderIPPool" => {
                seen.push(name.to_owned());
                if let Some(p) = pool(&what, name, &s.object["spec"], &mut out) {
                    if let Some(same) = out.objects.iter().find(|o| o["metadata"] == p["metadata"]) {
                        if same["spec"] != p["spec"] {
                            out.problems.push(format!(
                                "{what}: a pool of this name came earlier with another spec; not imported: rename one"
                            ));
                        }
                        continue;
                    }
                    pools.push(name.to_owned());
                    out.objects.push(p);
                }
            }
            "SpiderMultusConfig" => {
                if let Some(n) = network(&what, &s.object, &mut rails_by_order, &mut out) {
                    networks.push((what, n));
                }
            }
            other => out.problems.push(format!(
                "{what}: {other} has no railnet counterpart (SpiderIPPool and SpiderMultusConfig do); not imported"
            )),
        }
    }
    // A network naming a pool none of the files define would fail every
    // pod's ADD.
    for (what, n) in networks {
        if let Some(same) = out
            .objects
            .iter()
            .find(|o| o["metadata"] == n["metadata"] && o["kind"] == n["kind"])
        {
            if same["spec"] != n["spec"] {
                out.problems.push(format!(
                    "{what}: a network of this name and namespace came earlier with another spec; not imported: rename one"
                ));
            }
            continue;
        }
        let mut ok = true;
        for name in n["spec"]["ippools"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        {
            let name = name.as_str().unwrap_or_default();
            if pools.iter().any(|p| wildcard_match(name, p)) {
                continue;
            }
            ok = false;
            if seen.iter().any(|p| wildcard_match(name, p)) {
                out.problems.push(format!(
                    "{what}: ippools names {name}, whose pools were not imported (see above); not imported"
                ));
                continue;
            }
            let near = pools
                .iter()
                .min_by_key(|p| strsim::levenshtein(p, name))
                .filter(|p| strsim::levenshtein(p, name) <= 2)
                .map(|p| format!(" (a typo for {p}?)"))
                .unwrap_or_default();
            out.problems.push(format!(
                "{what}: ippools names {name}, which no SpiderIPPool given defines{near}; not imported: fix the name, or import its pool too"
            ));
        }
        if ok {
            out.objects.push(n);
        }
    }
    out
}

/// A SpiderIPPool's spec as a RailPool, checked as the agent checks pools.
fn pool(what: &str, name: &str, spec: &Value, out: &mut Import) -> Option<Value> {
    let Some(fields) = spec.as_object() else {
        out.problems.push(format!("{what}: no spec; not imported"));
        return None;
    };
    let mut rail = Map::new();
    let mut refused = false;
    for (k, v) in fields {
        match k.as_str() {
            // The same meaning, the same name (RailPools were made so).
            "ips" | "excludeIPs" | "gateway" | "routes" | "nodeName" | "namespaceName"
            | "disable" => {
                rail.insert(k.clone(), v.clone());
            }
            "subnet" => {
                let text = v.as_str().unwrap_or_default();
                match text.parse::<ipnet::IpNet>() {
                    Ok(net) if net.trunc() != net => {
                        out.notes.push(format!(
                            "{what}: subnet {text} has host bits set; written as its network {} (as Spiderpool reads it)",
                            net.trunc()
                        ));
                        rail.insert(k.clone(), net.trunc().to_string().into());
                    }
                    Ok(_) => {
                        rail.insert(k.clone(), v.clone());
                    }
                    Err(_) => {
                        out.problems.push(format!(
                            "{what}: subnet {v} is not a network (a.b.c.d/len); not imported"
                        ));
                        refused = true;
                    }
                }
            }
            // Implied by the subnet; checked against it below.
            "ipVersion" => {}
            "multusName" => {
                // "namespace/name" or "name": RailPools sort by the network
                // name in the CNI config, which is the NAD's name.
                let names: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|m| m.rsplit('/').next().unwrap_or(m).into())
                    .collect();
                out.notes.push(format!(
                    "{what}: multusName became networks (by network name; any NAD author can write any name, so it sorts networks but keeps no tenant out — namespaceName does)"
                ));
                rail.insert("networks".into(), names.into());
            }
            "default" => out.notes.push(format!(
                "{what}: default pools have no railnet counterpart; name the pool in each RailNetwork's ippools"
            )),
            "vlan" => out.notes.push(format!(
                "{what}: vlan is informational in Spiderpool; a VF's VLAN is the RailNetwork's vf.vlan"
            )),
            "nodeAffinity" | "namespaceAffinity" | "podAffinity" => {
                let instead = match k.as_str() {
                    "nodeAffinity" => "list the nodes in nodeName",
                    "namespaceAffinity" => "list the namespaces in namespaceName",
                    _ => "pods choose pools through their networks' ippools",
                };
                out.problems.push(format!(
                    "{what}: {k} is not evaluated by railnet: {instead}; not imported"
                ));
                refused = true;
            }
            other => {
                out.problems.push(format!(
                    "{what}: field {other} is unknown to this importer; not imported"
                ));
                refused = true;
            }
        }
    }
    if refused {
        return None;
    }
    let rail = Value::Object(rail);
    let checked = pool_spec_of(name, &rail)
        .map_err(|e| e.to_string())
        .and_then(|s| Pool::new(s).map_err(|e| e.to_string()));
    match checked {
        Err(why) => {
            // The guides' ranges run one past their subnet: say where it
            // ends.
            let hint = rail["subnet"]
                .as_str()
                .and_then(|t| t.parse::<ipnet::IpNet>().ok())
                .filter(|_| why.contains("not inside subnet"))
                .and_then(|n| Some((n.hosts().next()?, n.hosts().last()?)))
                .map(|(a, b)| format!(" (its hosts are {a}-{b})"))
                .unwrap_or_default();
            out.problems.push(format!(
                "{what}: {why}{hint}; not imported: fix it in the source"
            ));
            return None;
        }
        Ok(p) => {
            let want = if p.is_v6() { "ipv6" } else { "ipv4" };
            if let Some(v) = spec["ipVersion"].as_str()
                && v != want
            {
                out.problems.push(format!(
                    "{what}: ipVersion {v} but subnet {} is {want}; not imported",
                    rail["subnet"]
                ));
                return None;
            }
        }
    }
    Some(json!({
        "apiVersion": "railnet.io/v1alpha1",
        "kind": "RailPool",
        "metadata": {"name": name},
        "spec": rail,
    }))
}

/// The sub-object of a SpiderMultusConfig holding `cniType`'s settings.
fn block_of(cni_type: &str) -> Option<&'static str> {
    Some(match cni_type {
        "macvlan" => "macvlan",
        "ipvlan" => "ipvlan",
        "sriov" => "sriov",
        "ib-sriov" => "ibsriov",
        "ipoib" => "ipoib",
        _ => return None,
    })
}

/// The rail a config's name says (`…rail3…`, `gpu3…`, `…np3`), if any.
fn rail_in_name(name: &str) -> Option<u64> {
    let digits_after = |tag: &str| {
        let at = name.find(tag)? + tag.len();
        let d: String = name[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        d.parse().ok().filter(|n| (1..=64).contains(n))
    };
    digits_after("rail")
        .or_else(|| digits_after("gpu"))
        .or_else(|| digits_after("np"))
}

/// A SpiderMultusConfig as a RailNetwork, rendered as the controller
/// renders it.
fn network(what: &str, object: &Value, order: &mut u64, out: &mut Import) -> Option<Value> {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    let spec = &object["spec"];
    let cni_type = spec["cniType"].as_str().unwrap_or("macvlan");
    let Some(block) = block_of(cni_type) else {
        out.problems.push(format!(
            "{what}: cniType {cni_type} has no railnet counterpart (macvlan, ipvlan, sriov, ib-sriov, ipoib do); not imported"
        ));
        return None;
    };
    let mut rail = Map::new();
    rail.insert("type".into(), cni_type.into());
    let mut refused = false;
    let mut refuse = |why: String, out: &mut Import| {
        out.problems.push(format!("{what}: {why}; not imported"));
        refused = true;
    };
    for (k, v) in spec.as_object().into_iter().flatten() {
        match k.as_str() {
            "cniType" => {}
            k if k == block => {}
            "enableCoordinator" | "coordinator" => out.notes.push(format!(
                "{what}: {k} left out: railnet's rail routing (the pod's eBPF program, or rules) does what the coordinator's routes and rules did"
            )),
            "disableIPAM" if v == &Value::Bool(true) => {
                refuse("disableIPAM: railnet always gives each rail an address".into(), out)
            }
            "disableIPAM" => {}
            other => refuse(format!("field {other} is unknown to this importer"), out),
        }
    }
    let settings = spec[block].as_object().cloned().unwrap_or_default();
    let mut ib = Map::new();
    let mut vf = Map::new();
    for (k, v) in &settings {
        match (k.as_str(), cni_type) {
            ("ippools", _) => {
                let mut pools = Map::new();
                for fam in ["ipv4", "ipv6"] {
                    if let Some(list) = v.get(fam) {
                        pools.insert(fam.into(), list.clone());
                    }
                }
                rail.insert("ippools".into(), pools.into());
            }
            ("master", _) => {
                let masters: Vec<&str> = match v {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => vec![],
                };
                match masters[..] {
                    [m] => {
                        rail.insert("master".into(), m.into());
                    }
                    _ => refuse(
                        format!(
                            "master {v}: railnet puts one rail on one NIC (bond the NICs on the node and name the bond)"
                        ),
                        out,
                    ),
                }
            }
            ("matchMasterSubnet" | "rdmaIsolation" | "mtu" | "resourceName", _) => {
                rail.insert(k.clone(), v.clone());
            }
            ("rdmaResourceName", "macvlan" | "ipvlan") => {
                rail.insert("resourceName".into(), v.clone());
            }
            ("enableRdma", _) => out.notes.push(format!(
                "{what}: enableRdma needs no setting: railnet finds the rail's RDMA device itself"
            )),
            ("vlanID", "sriov") => {
                vf.insert("vlan".into(), v.clone());
            }
            ("pkey", "ib-sriov" | "ipoib") => match v.as_str() {
                Some(s) if s.starts_with("0x") || s.starts_with("0X") => {
                    ib.insert("pkey".into(), s.to_lowercase().into());
                }
                _ => refuse(
                    format!(
                        "pkey {v} is not written in hex: write the partition key as the subnet manager lists it, e.g. \"0x{v}\" if {v} is hex"
                    ),
                    out,
                ),
            },
            ("linkState" | "ibKubernetesEnabled", "ib-sriov") => {
                ib.insert(k.clone(), v.clone());
            }
            _ => refuse(
                format!("{block}.{k} has no railnet counterpart for cniType {cni_type}"),
                out,
            ),
        }
    }
    if !ib.is_empty() {
        rail.insert("ib".into(), ib.into());
    }
    if !vf.is_empty() {
        rail.insert("vf".into(), vf.into());
    }
    if let Some(group) = INJECT_LABELS
        .iter()
        .find_map(|l| meta["labels"][*l].as_str())
    {
        rail.insert("group".into(), group.into());
    }
    let number = match rail_in_name(name) {
        Some(n) => n,
        None => {
            *order += 1;
            out.notes.push(format!(
                "{what}: its name says no rail; given rail {order} by its place among those — set spec.rail to the rail it is"
            ));
            *order
        }
    };
    rail.insert("rail".into(), number.into());
    if refused {
        return None;
    }
    let rail = Value::Object(rail);
    if let Err(why) = crate::controller::render(&rail).and_then(|(mut conf, annotations)| {
        conf["name"] = name.into();
        // What Multus adds at ADD for a NAD with a device plugin resource.
        if annotations.contains_key(crate::controller::RESOURCE_NAME) {
            conf["deviceID"] = "0000:3b:00.2".into();
        }
        crate::netconf::NetConf::parse(conf.to_string().as_bytes())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }) {
        out.problems
            .push(format!("{what}: railnet refuses it: {why}; not imported"));
        return None;
    }
    Some(json!({
        "apiVersion": "railnet.io/v1alpha1",
        "kind": "RailNetwork",
        "metadata": {"name": name, "namespace": meta["namespace"].as_str().unwrap_or("default")},
        "spec": rail,
    }))
}

/// Parses the YAML documents of one file into sources (`label, document
/// N`); a document that is not YAML is an error naming it.
pub fn read(label: &str, text: &str) -> Result<Vec<Source>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let object: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("{label}, document {}: not YAML: {e}", i + 1))?;
        if !object.is_null() {
            out.push(Source {
                at: format!("{label}, document {}", i + 1),
                object,
            });
        }
    }
    Ok(out)
}

/// The imported objects as one YAML stream (`---` between documents).
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_norway::to_string(o).expect("JSON values are YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Import {
        import(&read("t.yaml", yaml).unwrap())
    }

    #[test]
    fn rail_numbers_come_from_the_names_the_guides_use() {
        assert_eq!(rail_in_name("gpu1-sriov"), Some(1));
        assert_eq!(rail_in_name("sriov-eno3np2"), Some(2));
        assert_eq!(rail_in_name("eno3np1-rail7"), Some(7));
        assert_eq!(rail_in_name("ib-sriov"), None);
        assert_eq!(rail_in_name("gpu0-net"), None);
    }

    #[test]
    fn a_bonded_master_or_an_unknown_field_is_refused_by_name() {
        let i = one(
            "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\nmetadata: {name: rail1, namespace: ai}\n\
             spec: {cniType: macvlan, macvlan: {master: [eno1, eno2], ippools: {ipv4: [p]}}}\n",
        );
        assert!(i.objects.is_empty());
        assert!(
            i.problems[0].contains("master") && i.problems[0].contains("bond"),
            "{:?}",
            i.problems
        );
        let i = one(
            "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\n\
             spec: {subnet: 10.1.0.0/24, surprise: 1}\n",
        );
        assert!(i.objects.is_empty());
        assert!(i.problems[0].contains("surprise"), "{:?}", i.problems);
    }

    #[test]
    fn an_injection_group_and_a_hex_pkey_map_and_a_bare_number_pkey_is_refused() {
        let smc = |pkey: &str| {
            format!(
                "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: gpu2-net}}\n\
                 spec: {{subnet: 10.2.0.0/24}}\n---\n\
                 apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\n\
                 metadata: {{name: gpu2-ib, namespace: ai, labels: {{cni.spidernet.io/rdma-resource-inject: gpu-ib}}}}\n\
                 spec: {{cniType: ib-sriov, ibsriov: {{resourceName: x/ib, pkey: {pkey}, rdmaIsolation: true, ippools: {{ipv4: [gpu2-net]}}}}}}\n"
            )
        };
        let i = one(&smc("\"0x8001\""));
        assert!(i.problems.is_empty(), "{:?}", i.problems);
        let net = &i.objects[1]["spec"];
        assert_eq!(net["group"], "gpu-ib");
        assert_eq!(net["rail"], 2);
        assert_eq!(net["ib"]["pkey"], "0x8001");
        assert_eq!(net["rdmaIsolation"], true);
        // The guide's `pkey: 1000`: hex or decimal? Not guessed.
        let i = one(&smc("1000"));
        assert_eq!(i.objects.len(), 1, "only the pool");
        assert!(
            i.problems[0].contains("pkey 1000 is not written in hex"),
            "{:?}",
            i.problems
        );
    }

    #[test]
    fn a_pool_within_its_subnet_maps_field_for_field() {
        let i = one(
            "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\n\
             spec: {ipVersion: ipv4, subnet: 10.1.0.0/24, gateway: 10.1.0.1, ips: [10.1.0.10-10.1.0.20], \
             excludeIPs: [10.1.0.15], nodeName: [n1], namespaceName: [ai], routes: [{to: 10.0.0.0/8, via: 10.1.0.1}]}\n",
        );
        assert!(i.problems.is_empty(), "{:?}", i.problems);
        let spec = &i.objects[0]["spec"];
        assert_eq!(spec["ips"], json!(["10.1.0.10-10.1.0.20"]));
        assert_eq!(spec["namespaceName"], json!(["ai"]));
        assert_eq!(spec["routes"][0]["via"], "10.1.0.1");
        assert!(spec.get("ipVersion").is_none());
    }
}
