// railnet's test GPU driver: a DRA driver for tests only, publishing
// "GPUs" with the PCIe root and NUMA attributes a real GPU driver
// publishes, so the real scheduler can align railnet's rail devices with
// them (matchAttribute resource.kubernetes.io/pcieRoot). Prepare hands out
// nothing (there is no GPU) but can be held until a file exists, so a test
// can restart railnet's agent between a pod's prepare and its start.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/utils/ptr"
)

const driver = "gpu.test.railnet.io"

type plugin struct{}

// PrepareResourceClaims reports the claim's devices of this driver as
// prepared.
func (p *plugin) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := map[types.UID]kubeletplugin.PrepareResult{}
	for _, claim := range claims {
		var devices []kubeletplugin.Device
		if claim.Status.Allocation != nil {
			for _, r := range claim.Status.Allocation.Devices.Results {
				if r.Driver != driver {
					continue
				}
				devices = append(devices, kubeletplugin.Device{
					Requests:   []string{r.Request},
					PoolName:   r.Pool,
					DeviceName: r.Device,
				})
			}
		}
		fmt.Printf("prepared %s/%s: %d GPUs\n", claim.Namespace, claim.Name, len(devices))
		out[claim.UID] = kubeletplugin.PrepareResult{Devices: devices}
	}
	return out, nil
}

func (p *plugin) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := map[types.UID]error{}
	for _, c := range claims {
		out[c.UID] = nil
	}
	return out, nil
}

// WatchHealthStatus: stand-in GPUs are always healthy; nothing to report.
func (p *plugin) WatchHealthStatus(ctx context.Context, _ chan<- kubeletplugin.DeviceHealthReport) error {
	<-ctx.Done()
	return nil
}

func (p *plugin) HandleError(ctx context.Context, err error, msg string) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", msg, err)
}

// gpus parses "root/numa/bdf,…" into devices gpu0, gpu1, …: each GPU's
// PCIe root, NUMA node and PCI address, published as the standard
// attributes a GPU driver publishes (resource.kubernetes.io/...).
func gpus(spec string) ([]resourceapi.Device, error) {
	var devices []resourceapi.Device
	for index, part := range strings.Split(spec, ",") {
		fields := strings.Split(part, "/")
		if len(fields) != 3 {
			return nil, fmt.Errorf("--gpus: %q is not root/numa/bdf", part)
		}
		root, numa, bdf := fields[0], fields[1], fields[2]
		n, err := strconv.ParseInt(numa, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("--gpus: %q: NUMA node %q is not a number", part, numa)
		}
		devices = append(devices, resourceapi.Device{
			Name: fmt.Sprintf("gpu%d", index),
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
				"index":                           {IntValue: ptr.To(int64(index))},
				"resource.kubernetes.io/pcieRoot": {StringValue: ptr.To(root)},
				"resource.kubernetes.io/numaNode": {IntValue: ptr.To(n)},
				"resource.kubernetes.io/pciBusID": {StringValue: ptr.To(bdf)},
			},
		})
	}
	return devices, nil
}

func main() {
	node := flag.String("node", "", "this node's name")
	kubeconfig := flag.String("kubeconfig", "", "the node's kubeconfig (the kubelet's: nodes may publish their own slices)")
	spec := flag.String("gpus", "", "GPUs as root/numa/bdf,…")
	kubeletDir := flag.String("kubelet-dir", "/var/lib/kubelet", "the kubelet's root directory")
	flag.Parse()
	devices, err := gpus(*spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := kubernetes.NewForConfigOrDie(config)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Both may not exist yet: the driver can start before the kubelet
	// made its registry directory (the kubelet takes an existing one).
	dataDir := filepath.Join(*kubeletDir, "plugins", driver)
	registryDir := filepath.Join(*kubeletDir, "plugins_registry")
	for _, dir := range []string{dataDir, registryDir} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	helper, err := kubeletplugin.Start(ctx, &plugin{},
		kubeletplugin.DriverName(driver),
		kubeletplugin.NodeName(*node),
		kubeletplugin.KubeClient(client),
		kubeletplugin.HealthService(false),
		kubeletplugin.PluginDataDirectoryPath(dataDir),
		kubeletplugin.RegistrarDirectoryPath(registryDir),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		os.Exit(1)
	}
	// The slices are owned by the Node, which the kubelet may not have
	// registered yet: try until it has.
	for {
		err = helper.PublishResources(ctx, resourceslice.DriverResources{
			Pools: map[string]resourceslice.Pool{*node: {Slices: []resourceslice.Slice{{Devices: devices}}}},
		})
		if err == nil {
			break
		}
		fmt.Fprintln(os.Stderr, "publish (again in 1s):", err)
		select {
		case <-ctx.Done():
			os.Exit(1)
		case <-time.After(time.Second):
		}
	}
	fmt.Printf("%s serving %d GPUs on %s\n", driver, len(devices), *node)
	<-ctx.Done()
	helper.Stop()
}
