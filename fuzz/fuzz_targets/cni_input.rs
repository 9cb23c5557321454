//! Whatever Multus, a runtime or a person hands railnet: the network config
//! on stdin, `CNI_ARGS`, a request on the agent's socket. Each gives an
//! answer or an error that says something — never a panic, never a hang.

#![no_main]

use libfuzzer_sys::fuzz_target;
use railnet_agent::{api, netconf::NetConf};

fuzz_target!(|data: &[u8]| {
    match NetConf::parse(data) {
        Ok(conf) => {
            // What the agent derives from an accepted config must not
            // panic either.
            let _ = conf.requested_ips();
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error that says nothing"),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let args = api::parse_cni_args(text);
        for (k, v) in &args {
            assert!(!k.contains(';') && !v.contains(';'), "{k}={v} spans two CNI_ARGS pairs");
        }
    }
    let _ = serde_json::from_slice::<api::Request>(data);
});
