//! railnet's DCB netlink request (what `railnetctl doctor` reads PFC and
//! DSCP trust with) is iproute2's `dcb pfc show` request byte for byte,
//! the sequence number aside; and the real kernel's answers for a device
//! without DCB (veth) and for no device at all are read as such. No device
//! on these machines implements DCB: replies with data are tested in the
//! agent's unit tests, laid out as the kernel writes them.

use railnet_agent::dcb::{DcbError, RTM_GETDCB, ieee_get, ieee_get_request};
use railnet_tests::{Netns, netlink_sends};

#[test]
fn the_dcb_request_is_iproute2s_byte_for_byte_and_veth_has_no_dcb() {
    let ns = Netns::new("dcb");
    // Names of two lengths: the attribute's padding differs.
    for dev in ["v0", "rail-nic-10"] {
        ns.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            &format!("p{}", dev.len()),
        ]);
        let sends = netlink_sends(&ns, "dcb", &["pfc", "show", "dev", dev]);
        let theirs = sends
            .iter()
            .find(|m| m.len() >= 20 && u16::from_ne_bytes([m[4], m[5]]) == RTM_GETDCB)
            .unwrap_or_else(|| panic!("dcb sent no RTM_GETDCB: {sends:?}"));
        let seq = u32::from_ne_bytes([theirs[8], theirs[9], theirs[10], theirs[11]]);
        assert_eq!(&ieee_get_request(dev, seq), theirs, "{dev}");
        let dev = dev.to_owned();
        assert_eq!(ns.run(move || ieee_get(&dev)), Err(DcbError::Unsupported));
    }
    assert_eq!(
        ns.run(|| ieee_get("no-such-nic")),
        Err(DcbError::Kernel(libc::ENODEV))
    );
}
