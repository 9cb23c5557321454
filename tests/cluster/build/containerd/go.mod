// Builds containerd, its runc shim and ctr at a pinned release for railnet's
// cluster tests (Debian 12's containerd 1.6 lacks CRI calls kubelet 1.37 makes).
module railnet.test/containerd-build

go 1.26.6

require github.com/containerd/containerd/v2 v2.4.2
