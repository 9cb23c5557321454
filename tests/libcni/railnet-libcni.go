// railnet-libcni drives CNI plugins through Debian's libcni, the library
// container runtimes and Multus use, so railnet's tests meet a real client:
// its config parsing, capability filtering, result caching and CHECK/DEL
// with the cached result.
//
// usage: railnet-libcni add|check|del <config.json> <containerID> <netns> <ifname> [args] [capabilities]
//
//	       railnet-libcni pod-add <containerID> <netns> <config.json>=<ifname>...
//
//	config.json   a network config or a conflist
//	args          CNI_ARGS as Multus sends them: K=V;K=V
//	capabilities  runtimeConfig capability args as JSON, e.g. {"CNIDeviceInfoFile":"/x"}
//
// pod-add is what Multus does for one pod: the runtime executes Multus once,
// and Multus adds the pod's networks one after the other from that one
// process (on a failure it deletes those already added, last first).
//
// Plugins are found in CNI_PATH; results are cached in CNI_CACHE_DIR. ADD
// prints the result as JSON; a failure prints the plugin's error and exits 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func fail(err error) {
	if e, ok := err.(*types.Error); ok {
		out, _ := json.Marshal(e)
		fmt.Fprintln(os.Stderr, string(out))
	} else {
		fmt.Fprintln(os.Stderr, err.Error())
	}
	os.Exit(1)
}

// load reads a network config or a conflist as a conflist.
func load(file string) *libcni.NetworkConfigList {
	bytes, err := os.ReadFile(file)
	if err != nil {
		fail(err)
	}
	var probe map[string]interface{}
	if err := json.Unmarshal(bytes, &probe); err != nil {
		fail(err)
	}
	var list *libcni.NetworkConfigList
	if _, ok := probe["plugins"]; ok {
		list, err = libcni.ConfListFromBytes(bytes)
	} else {
		var conf *libcni.NetworkConfig
		conf, err = libcni.ConfFromBytes(bytes)
		if err == nil {
			list, err = libcni.ConfListFromConf(conf)
		}
	}
	if err != nil {
		fail(err)
	}
	return list
}

func newCNI() *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir(strings.Split(os.Getenv("CNI_PATH"), ":"), os.Getenv("CNI_CACHE_DIR"), nil)
}

// podAdd adds every <config.json>=<ifname> to one pod in order, as Multus
// adds a pod's delegates; on a failure it deletes the ones added, last
// first, and fails. Prints the results as one JSON array.
func podAdd(cid, netns string, nets []string) {
	cni, ctx := newCNI(), context.Background()
	type added struct {
		list *libcni.NetworkConfigList
		rt   *libcni.RuntimeConf
	}
	var done []added
	var results []interface{}
	for _, n := range nets {
		parts := strings.SplitN(n, "=", 2)
		if len(parts) != 2 {
			fmt.Fprintf(os.Stderr, "pod-add: %q is not <config.json>=<ifname>\n", n)
			os.Exit(2)
		}
		list := load(parts[0])
		rt := &libcni.RuntimeConf{ContainerID: cid, NetNS: netns, IfName: parts[1]}
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			for i := len(done) - 1; i >= 0; i-- {
				_ = cni.DelNetworkList(ctx, done[i].list, done[i].rt)
			}
			fail(err)
		}
		done = append(done, added{list, rt})
		results = append(results, res)
	}
	out, err := json.Marshal(results)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) >= 5 && os.Args[1] == "pod-add" {
		podAdd(os.Args[2], os.Args[3], os.Args[4:])
		return
	}
	if len(os.Args) < 6 {
		fmt.Fprintln(os.Stderr, "usage: railnet-libcni add|check|del <config.json> <containerID> <netns> <ifname> [args] [capabilities]")
		os.Exit(2)
	}
	op, file, cid, netns, ifname := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	list := load(file)
	rt := &libcni.RuntimeConf{ContainerID: cid, NetNS: netns, IfName: ifname}
	if len(os.Args) > 6 && os.Args[6] != "" {
		for _, kv := range strings.Split(os.Args[6], ";") {
			parts := strings.SplitN(kv, "=", 2)
			if len(parts) == 2 {
				rt.Args = append(rt.Args, [2]string{parts[0], parts[1]})
			}
		}
	}
	if len(os.Args) > 7 && os.Args[7] != "" {
		if err := json.Unmarshal([]byte(os.Args[7]), &rt.CapabilityArgs); err != nil {
			fail(err)
		}
	}
	cni, ctx := newCNI(), context.Background()
	switch op {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		out, err := json.Marshal(res)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(out))
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "unknown operation %q\n", op)
		os.Exit(2)
	}
}
