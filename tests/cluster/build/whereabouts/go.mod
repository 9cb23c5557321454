// Builds the whereabouts IPAM plugin at a pinned release, the cluster-wide
// reference IPAM railnet's cluster benchmark compares with (not the tests).
module railnet.test/whereabouts-build

go 1.26.0

require github.com/k8snetworkplumbingwg/whereabouts v0.9.2
