//! `railnetctl doctor`: on the node, or `--compare` across every node
//! through the agents (what differs is the usual cause of one slow rail).

use std::process::ExitCode;

use railnet_agent::{
    doctor::{Outcome, Report, compare::compare},
    rdma::NetnsMode,
};

use crate::agents;

/// On this node: the report as text or JSON; exit 1 if a check failed.
pub fn here(expect: Option<NetnsMode>, json: bool) -> ExitCode {
    let report = railnet_agent::doctor::run(expect);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serialises")
        );
    } else {
        print!("{report}");
    }
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Every node's doctor, run in its agent; each node's tally and what
/// differs between them. Exit 1 when something differs or a node could
/// not be asked, 2 when the agents could not be found.
pub fn compare_nodes(namespace: Option<&str>, json: bool) -> ExitCode {
    let (rt, _client, found) = match agents::find(namespace, "railnetctl doctor --compare") {
        Ok(x) => x,
        Err(e) => {
            eprintln!("railnetctl doctor --compare: {e}");
            return ExitCode::from(2);
        }
    };
    let answers = rt.block_on(futures::future::join_all(found.iter().map(
        |a| async move {
            let out = a.output(&["railnetctl", "doctor", "-o", "json"]).await;
            (
                a.node.clone(),
                out.and_then(|text| {
                    serde_json::from_str::<Report>(&text)
                        .map_err(|e| format!("{}: not a doctor report: {e}", a.pod))
                }),
            )
        },
    )));
    let mut reports = Vec::new();
    let mut broken = false;
    for (node, answer) in answers {
        match answer {
            Ok(report) => reports.push((node, report)),
            Err(e) => {
                eprintln!("railnetctl doctor --compare: {node}: {e}");
                broken = true;
            }
        }
    }
    let nics: Vec<_> = reports
        .iter()
        .map(|(node, r)| (node.clone(), r.lossless.clone()))
        .collect();
    let differences = compare(&nics);
    let tally = |r: &Report, o: Outcome| r.findings.iter().filter(|f| f.outcome == o).count();
    if json {
        let nodes: serde_json::Map<String, serde_json::Value> = reports
            .iter()
            .map(|(node, r)| {
                (
                    node.clone(),
                    serde_json::json!({
                        "ok": tally(r, Outcome::Ok),
                        "warn": tally(r, Outcome::Warn),
                        "fail": tally(r, Outcome::Fail),
                    }),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "nodes": nodes,
                "differences": differences,
            }))
            .expect("serialises")
        );
    } else {
        for (node, r) in &reports {
            println!(
                "{node}: {} ok, {} warnings, {} failed",
                tally(r, Outcome::Ok),
                tally(r, Outcome::Warn),
                tally(r, Outcome::Fail)
            );
        }
        let count: std::collections::BTreeSet<&String> =
            nics.iter().flat_map(|(_, n)| n.keys()).collect();
        if count.is_empty() {
            println!("no RoCE rail NIC on any node: nothing to compare");
        } else if differences.is_empty() {
            println!(
                "the lossless settings of {} rail NIC(s) are alike on every node",
                count.len()
            );
        } else {
            println!("differences between the nodes:");
            for d in &differences {
                println!("  {d}");
            }
        }
    }
    if broken || !differences.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
