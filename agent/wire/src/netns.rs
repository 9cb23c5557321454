//! Network namespaces as the CNI and the agent pass them: by fd.

/// Whether `fd` is a network namespace (`NS_GET_NSTYPE`, Linux 4.11).
pub fn is_network_namespace(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // _IO(0xb7, 0x3), linux/nsfs.h.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without argument on a descriptor the caller holds.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}
