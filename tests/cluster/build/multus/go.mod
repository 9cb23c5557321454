// Builds the Multus thin plugin at a pinned release for railnet's cluster tests.
module railnet.test/multus-build

go 1.25.0

require gopkg.in/k8snetworkplumbingwg/multus-cni.v4 v4.3.0
