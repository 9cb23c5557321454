// Command railnet-test-deviceplugin is a kubelet device plugin for
// railnet's cluster tests. It advertises the PCI addresses given to it as
// one extended resource (e.g. railnet.io/rail1-vf), as the SR-IOV network
// device plugin advertises a rail NIC's VFs, so kubelet allocates one to a
// pod and Multus reads it back from kubelet's pod-resources API and passes
// it to the rail network's plugin as deviceID. The devices are stand-ins
// (veths with a sysfs tree): nothing here touches them.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

// ListAndWatch sends the devices once, all healthy, and holds the stream
// open: kubelet takes a closed stream for a plugin that is gone.
func (p *plugin) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

// Allocate gives each container the PCI addresses kubelet chose, in the
// environment variable the SR-IOV device plugin uses; Multus does not need
// it (it asks kubelet), the workload may.
func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		log.Printf("allocating %v", c.DevicesIds)
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"PCIDEVICE_RAILNET_IO": strings.Join(c.DevicesIds, ",")},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func main() {
	resource := flag.String("resource", "", "the extended resource name, e.g. railnet.io/rail1-vf")
	devices := flag.String("devices", "", "comma-separated PCI addresses to advertise")
	dir := flag.String("dir", pluginapi.DevicePluginPath, "kubelet's device plugin directory")
	flag.Parse()
	if *resource == "" || *devices == "" {
		log.Fatal("usage: railnet-test-deviceplugin --resource <name> --devices <bdf>[,<bdf>…]")
	}
	p := &plugin{}
	for _, id := range strings.Split(*devices, ",") {
		p.devices = append(p.devices, &pluginapi.Device{ID: id, Health: pluginapi.Healthy})
	}

	// kubelet makes its device plugin directory and registration socket
	// as it starts: wait for them for a minute.
	kubelet := filepath.Join(*dir, "kubelet.sock")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if _, err := os.Stat(kubelet); err == nil {
			break
		}
		if time.Now().After(deadline) {
			log.Fatalf("%s did not appear: is kubelet running?", kubelet)
		}
	}

	endpoint := "railnet-test-" + strings.NewReplacer("/", "-", ".", "-").Replace(*resource) + ".sock"
	sock := filepath.Join(*dir, endpoint)
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listening on %s: %v", sock, err)
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() {
		if err := server.Serve(lis); err != nil {
			log.Fatalf("serving %s: %v", sock, err)
		}
	}()

	conn, err := grpc.NewClient("unix://"+kubelet,
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("kubelet's registration socket: %v", err)
	}
	// kubelet may still be starting: try for a minute.
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
			Version:      pluginapi.Version,
			Endpoint:     endpoint,
			ResourceName: *resource,
		})
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			log.Fatalf("registering %s with kubelet: %v", *resource, err)
		}
		time.Sleep(time.Second)
	}
	_ = conn.Close()
	log.Printf("registered %s with %d devices at %s", *resource, len(p.devices), sock)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Stop()
	_ = os.Remove(sock)
}
