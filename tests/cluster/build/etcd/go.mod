// Builds etcd at a pinned release for railnet's cluster tests (Debian 12's
// 3.4 is older than Kubernetes 1.37 expects). etcd's server module replaces
// its sibling modules with local paths; this module requires the releases.
module railnet.test/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.6.16

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 v3.6.16
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 v3.6.16
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 v3.6.16
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 v3.6.16
)
