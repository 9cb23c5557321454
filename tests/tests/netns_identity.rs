//! The sweep's notion of "this pod's netns is gone" must survive the kernel
//! reusing a dead namespace's inode number for a new one: otherwise a pod
//! deleted without DEL keeps its pins and addresses for as long as some
//! other pod happens to hold its old number (seen in CI on Linux 6.1, where
//! the number went to the next namespace at once).

use railnet_agent::netns::{LiveNetns, NetnsId, PodNetns};
use railnet_tests::Netns;

#[test]
fn a_reused_netns_inode_does_not_keep_a_gone_pod_alive() {
    let gone = Netns::new("gone");
    let gone_id = PodNetns::open(&gone.path()).unwrap().id();
    assert_ne!(gone_id.inode, 0);
    assert_ne!(gone_id.cookie, 0, "SO_NETNS_COOKIE unreadable");
    assert!(
        LiveNetns::scan().contains(gone_id),
        "a live netns judged gone"
    );
    drop(gone);

    // The kernel frees the number when its cleanup work runs and gives
    // the lowest free one to the next namespace: whether this test's new
    // namespace gets exactly `gone`'s depends on every other namespace
    // made meanwhile. So take the reuse as given and put it in place:
    // `gone` as it is recorded, with the number of a namespace alive now.
    let newcomer = Netns::new("newcomer");
    let newcomer_id = PodNetns::open(&newcomer.path()).unwrap().id();
    let recorded_gone = NetnsId {
        inode: newcomer_id.inode,
        cookie: gone_id.cookie,
    };
    let live = LiveNetns::scan();
    assert!(live.contains(newcomer_id), "the new namespace is alive");
    assert!(
        !live.contains(recorded_gone),
        "the gone pod's netns judged alive because its inode {} was reused",
        newcomer_id.inode
    );
    // A record from before cookies (0) is judged by its inode alone.
    assert!(live.contains(NetnsId {
        inode: newcomer_id.inode,
        cookie: 0
    }));
}
