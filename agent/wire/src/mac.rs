//! MAC addresses as railnet reads and writes them: `aa:bb:cc:dd:ee:ff`.

/// Parses `aa:bb:cc:dd:ee:ff` (any address, multicast and zero included;
/// [`crate::netconf::parse_mac`] is what a pod may ask for).
pub fn parse(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Formats as `aa:bb:cc:dd:ee:ff`.
pub fn format(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_read_back_as_written_and_near_misses_are_refused() {
        let mac = parse("02:00:0a:ff:00:01").unwrap();
        assert_eq!(mac, [2, 0, 10, 255, 0, 1]);
        assert_eq!(format(mac), "02:00:0a:ff:00:01");
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:0g",
            "02::00:00:00:00:01",
            "002:00:00:00:00:01",
            "+2:00:00:00:00:01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
