// Command vcsim-launcher serves a govmomi vCenter simulator whose inventory is built from a
// topology file: clusters, ESXi hosts with FibreChannel/iSCSI HBAs seeing LUNs through multipath
// paths, VMFS datastores on those LUNs, NFS and local datastores, standard port groups on every host, VMs with
// disks, NICs, custom attributes, firmware, hardware version and a filled NVRAM file, proxy VMs with a
// FibreChannel HBA passed through, and vSphere tags. Datastore HTTP PUT stores zero blocks as holes
// (datastore_put.go). It is built offline from Debian's golang-go and
// golang-github-vmware-govmomi-dev (GO111MODULE=off GOPATH=/usr/share/gocode go build).
//
// Credentials come from the environment (VCSIM_USERNAME, VCSIM_PASSWORD), never from argv.
// When ready it prints one JSON line on stdout: {"url": ..., "pid": ..., "datastores": {name: dir}}.
// SIGTERM or SIGINT stops the server and removes every temporary directory it created. SIGUSR1 ends every
// session (SOAP and /api) as a vCenter restart does and prints {"dropped": {"soap": n, "api": m}}.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vapi/rest"
	_ "github.com/vmware/govmomi/vapi/simulator"
	"github.com/vmware/govmomi/vapi/tags"
	"github.com/vmware/govmomi/vim25/types"
)

// Topology is the file format. Field names follow simulator.Model where one exists
// (Datacenter, Folder, Cluster, Host, Datastore, Machine), but each holds explicit items, not counts.
type Topology struct {
	Datacenter string
	Folder     []string
	Cluster    []string
	Lun        []LunSpec
	Host       []HostSpec
	Datastore  []DatastoreSpec
	Network    []NetworkSpec // standard port groups on every host's vSwitch0, besides the simulator's "VM Network"
	Machine    []MachineSpec
	Category   []CategorySpec
	Proxy      []json.RawMessage // physical proxies are not in vCenter; read by the Python testbed only
}

type LunSpec struct {
	Name       string // naa.* canonical name
	Vendor     string
	Model      string
	CapacityGB int64
}

type HbaSpec struct {
	Device string // vmhbaN
	Type   string // FibreChannel | iSCSI
	Wwnn   string
	Wwpn   string
	Iqn    string
}

type PathSpec struct {
	Hba    string
	Target string
	State  string // active | standby | dead | disabled
}

type HostLunSpec struct {
	Name string
	Path []PathSpec
}

type HostSpec struct {
	Name    string
	Cluster string
	Hba     []HbaSpec
	Lun     []HostLunSpec
}

type DatastoreSpec struct {
	Name       string
	Type       string // VMFS | NFS | NFS41 | local
	Lun        string
	RemoteHost string
	RemotePath string
	Host       []string
}

type DiskSpec struct {
	Datastore  string
	CapacityMB int64
	Controller string // pvscsi | lsilogic
}

type NetworkSpec struct {
	Name string
	Vlan int32 // 0-4094; 0: untagged
}

type NicSpec struct {
	Network string // a Network name or "VM Network"
	Type    string // vmxnet3 (default) | e1000e | e1000
}

type MachineSpec struct {
	Name        string
	Folder      string
	Host        string
	PowerState  string
	Cbt         bool
	Cpu         int32
	MemoryMB    int64
	Firmware    string // bios (default) | efi
	Version     string // hardware version, vmx-NN; default: the simulator's (vmx-13)
	Disk        []DiskSpec
	Nic         []NicSpec
	Passthrough []string          // host HBAs (vmhbaN) passed through to this VM
	Tag         []string          // Category:Tag
	Attribute   map[string]string // custom attributes (CustomFieldsManager fields of VirtualMachine)
	// QuiesceFault: a vim25 fault name; quiesced snapshots of the VM fail with it (snapshot_faults.go)
	QuiesceFault string
	// ConsolidationNeeded: each removal of one of the VM's snapshots leaves runtime.consolidationNeeded true
	ConsolidationNeeded bool
}

type CategorySpec struct {
	Name        string
	Cardinality string
	Tag         []string
}

type launcher struct {
	ctx    context.Context
	topo   *Topology
	client *govmomi.Client
	login  *url.Userinfo
	dc     *object.Datacenter
	dirs   []string
	scale  float64

	folders  map[string]*object.Folder
	clusters map[string]*object.ClusterComputeResource
	hosts    map[string]*object.HostSystem
	dsDir    map[string]string
	luns     map[string]int    // canonical name -> LUN number
	hbaPci   map[string]string // "host/vmhbaN" -> PCI address
	networks map[string]bool   // port group names a NIC may name
	vms      map[string]types.ManagedObjectReference
}

func main() {
	topoPath := flag.String("topology", "", "topology JSON file")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "TLS certificate (PEM); serves https when set")
	keyFile := flag.String("key", "", "TLS private key (PEM)")
	scale := flag.Float64("disk-scale", 1, "multiply every disk capacity by this factor")
	cbtWindow := flag.Int64("cbt-window", defaultCBTWindow, "bytes covered by one QueryChangedDiskAreas answer")
	datastoreAuth := flag.Bool("datastore-auth", true, "datastore HTTP (/folder) needs a live session cookie")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("vcsim-launcher: ")

	if *topoPath == "" {
		log.Fatal("-topology is required")
	}
	topo, err := readTopology(*topoPath)
	if err != nil {
		log.Fatalf("topology %s: %v", *topoPath, err)
	}
	user, pass := os.Getenv("VCSIM_USERNAME"), os.Getenv("VCSIM_PASSWORD")
	if user == "" || pass == "" {
		log.Fatal("VCSIM_USERNAME and VCSIM_PASSWORD must be set")
	}

	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster, model.ClusterHost, model.Host = 0, 0, 0
	model.Machine, model.Datastore, model.Portgroup = 0, 0, 0
	if err := model.Create(); err != nil {
		log.Fatalf("create model: %v", err)
	}
	model.Service.RegisterEndpoints = true
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(user, pass)}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("tls: %v", err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	server := model.Service.NewServer()
	server.Config.Handler = wrapPrivileges(server.Config.Handler, model.Service)
	facade := newAPIFacade(server.Config.Handler)
	server.Config.Handler = facade

	l := &launcher{ctx: context.Background(), topo: topo, scale: *scale}
	server.Config.Handler = wrapCBT(server.Config.Handler, *cbtWindow, func(ds string) (string, bool) {
		dir, ok := l.dsDir[ds]
		return dir, ok
	})
	server.Config.Handler = wrapSnapshotFaults(server.Config.Handler, topo)
	server.Config.Handler = wrapDatastorePut(server.Config.Handler, datastoreDir)
	server.Config.Handler = wrapSessions(server.Config.Handler, *datastoreAuth)
	cleanup := func() {
		server.Close()
		model.Remove()
		for _, d := range l.dirs {
			_ = os.RemoveAll(d)
		}
	}
	if err := l.build(server.URL); err != nil {
		cleanup()
		log.Fatalf("build inventory: %v", err)
	}

	public := *server.URL
	public.User = nil
	ready, _ := json.Marshal(map[string]interface{}{
		"url":        public.String(),
		"pid":        os.Getpid(),
		"datastores": l.dsDir,
	})
	// Listen for signals before announcing readiness: a SIGTERM right after the ready line must still clean up.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	drop := make(chan os.Signal, 1)
	signal.Notify(drop, syscall.SIGUSR1)
	go func() {
		for range drop {
			soap, api, err := dropSessions(context.Background(), server.URL, facade)
			line, _ := json.Marshal(map[string]interface{}{"dropped": map[string]int{"soap": soap, "api": api}})
			if err != nil {
				line, _ = json.Marshal(map[string]interface{}{"dropped": nil, "error": err.Error()})
			}
			fmt.Println(string(line))
			_ = os.Stdout.Sync()
		}
	}()
	fmt.Println(string(ready))
	_ = os.Stdout.Sync()
	<-sig
	cleanup()
}

func readTopology(p string) (*Topology, error) {
	data, err := ioutil.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var t Topology
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return nil, err
	}
	if t.Datacenter == "" {
		t.Datacenter = "DC0"
	}
	return &t, nil
}

func (l *launcher) build(u *url.URL) error {
	ctx := l.ctx
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return err
	}
	l.client = c
	l.login = u.User
	defer func() { _ = c.Logout(ctx) }()

	dc, err := find.NewFinder(c.Client).DefaultDatacenter(ctx)
	if err != nil {
		return err
	}
	l.dc = dc
	if l.topo.Datacenter != "DC0" {
		task, err := l.dc.Rename(ctx, l.topo.Datacenter)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("rename datacenter: %w", err)
		}
	}

	steps := []func() error{l.buildFolders, l.buildHosts, l.buildNetworks, l.buildDatastores, l.buildMachines,
		l.buildAttributes, l.buildTags}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

func (l *launcher) buildFolders() error {
	folders, err := l.dc.Folders(l.ctx)
	if err != nil {
		return err
	}
	l.folders = map[string]*object.Folder{"": folders.VmFolder}
	for _, p := range l.topo.Folder {
		parent, ok := l.folders[path.Dir(p)]
		if path.Dir(p) == "." {
			parent, ok = folders.VmFolder, true
		}
		if !ok {
			return fmt.Errorf("folder %q: parent not declared before it", p)
		}
		f, err := parent.CreateFolder(l.ctx, path.Base(p))
		if err != nil {
			return fmt.Errorf("folder %q: %w", p, err)
		}
		l.folders[p] = f
	}
	l.clusters = map[string]*object.ClusterComputeResource{}
	for _, name := range l.topo.Cluster {
		cl, err := folders.HostFolder.CreateCluster(l.ctx, name, types.ClusterConfigSpecEx{})
		if err != nil {
			return fmt.Errorf("cluster %q: %w", name, err)
		}
		l.clusters[name] = cl
	}
	return nil
}

// wwn parses "20:00:00:25:b5:01:00:01" into the int64 vSphere reports.
func wwn(s string) int64 {
	var v uint64
	for _, part := range strings.Split(s, ":") {
		var b uint64
		_, _ = fmt.Sscanf(part, "%x", &b)
		v = v<<8 | b
	}
	return int64(v)
}

func (l *launcher) buildHosts() error {
	l.hosts = map[string]*object.HostSystem{}
	l.luns = map[string]int{}
	l.hbaPci = map[string]string{}
	lunSpec := map[string]LunSpec{}
	for i, lun := range l.topo.Lun {
		l.luns[lun.Name] = i + 1
		lunSpec[lun.Name] = lun
	}
	for _, hs := range l.topo.Host {
		cl, ok := l.clusters[hs.Cluster]
		if !ok {
			return fmt.Errorf("host %q: unknown cluster %q", hs.Name, hs.Cluster)
		}
		task, err := cl.AddHost(l.ctx, types.HostConnectSpec{HostName: hs.Name}, true, nil, nil)
		if err != nil {
			return err
		}
		info, err := task.WaitForResult(l.ctx, nil)
		if err != nil {
			return fmt.Errorf("host %q: %w", hs.Name, err)
		}
		ref := info.Result.(types.ManagedObjectReference)
		l.hosts[hs.Name] = object.NewHostSystem(l.client.Client, ref)

		dev, err := l.storageDevice(hs, lunSpec)
		if err != nil {
			return err
		}
		h := simulator.Map.Get(ref).(*simulator.HostSystem)
		h.Config.StorageDevice = dev
		h.Config.FileSystemVolume = &types.HostFileSystemVolumeInfo{}
	}
	return nil
}

// storageDevice builds a host's config.storageDevice: a local block HBA with its boot disk, the
// declared FC/iSCSI HBAs, one ScsiDisk per visible LUN and one multipath logical unit per LUN.
func (l *launcher) storageDevice(hs HostSpec, lunSpec map[string]LunSpec) (*types.HostStorageDeviceInfo, error) {
	dev := &types.HostStorageDeviceInfo{MultipathInfo: &types.HostMultipathInfo{}}
	hbaKey := map[string]string{}
	addHba := func(device string, hba types.BaseHostHostBusAdapter) {
		key := "key-vim.host.HostBusAdapter-" + device
		hba.GetHostHostBusAdapter().Key = key
		hbaKey[device] = key
		dev.HostBusAdapter = append(dev.HostBusAdapter, hba)
	}
	addHba("vmhba0", &types.HostBlockHba{HostHostBusAdapter: types.HostHostBusAdapter{
		Device: "vmhba0", Status: "online", Model: "Smart Array P440ar", Driver: "nhpsa", Pci: "0000:03:00.0",
		StorageProtocol: "scsi"}})
	for i, h := range hs.Hba {
		base := types.HostHostBusAdapter{Device: h.Device, Bus: int32(4 + i), Status: "online",
			Pci: fmt.Sprintf("0000:%02x:00.0", 4+i)}
		l.hbaPci[hs.Name+"/"+h.Device] = base.Pci
		switch h.Type {
		case "FibreChannel":
			base.Model, base.Driver = "QLogic QLE2692 16Gb FC", "qlnativefc"
			addHba(h.Device, &types.HostFibreChannelHba{HostHostBusAdapter: base,
				NodeWorldWideName: wwn(h.Wwnn), PortWorldWideName: wwn(h.Wwpn), PortType: "fabric", Speed: 16})
		case "iSCSI":
			base.Model, base.Driver, base.Pci = "iSCSI Software Adapter", "iscsi_vmk", ""
			addHba(h.Device, &types.HostInternetScsiHba{HostHostBusAdapter: base, IsSoftwareBased: true,
				IScsiName: h.Iqn})
		default:
			return nil, fmt.Errorf("host %q hba %q: unknown type %q", hs.Name, h.Device, h.Type)
		}
	}

	addDisk := func(name string, local bool, vendor, model string, gb int64, paths []types.HostMultipathInfoPath) {
		key := "key-vim.host.ScsiDisk-" + name
		disk := &types.HostScsiDisk{
			ScsiLun: types.ScsiLun{
				HostDevice:       types.HostDevice{DeviceName: "/vmfs/devices/disks/" + name, DeviceType: "disk"},
				Key:              key,
				Uuid:             strings.TrimPrefix(name, "naa."),
				CanonicalName:    name,
				DisplayName:      fmt.Sprintf("%s Fibre Channel Disk (%s)", vendor, name),
				LunType:          "disk",
				Vendor:           vendor,
				Model:            model,
				OperationalState: []string{"ok"},
			},
			Capacity:   types.HostDiskDimensionsLba{BlockSize: 512, Block: gb * 1024 * 1024 * 2},
			DevicePath: "/vmfs/devices/disks/" + name,
			LocalDisk:  types.NewBool(local),
			Ssd:        types.NewBool(false),
		}
		dev.ScsiLun = append(dev.ScsiLun, disk)
		for i := range paths {
			paths[i].Lun = "key-vim.host.MultipathInfo.LogicalUnit-" + name
		}
		dev.MultipathInfo.Lun = append(dev.MultipathInfo.Lun, types.HostMultipathInfoLogicalUnit{
			Key:    "key-vim.host.MultipathInfo.LogicalUnit-" + name,
			Id:     name,
			Lun:    key,
			Path:   paths,
			Policy: &types.HostMultipathInfoLogicalUnitPolicy{Policy: "VMW_PSP_RR"},
		})
	}

	local := "mpx.vmhba0:C0:T0:L0"
	addDisk(local, true, "HP", "LOGICAL VOLUME", 600, []types.HostMultipathInfoPath{{
		Key: "key-vim.host.MultipathInfo.Path-vmhba0:C0:T0:L0", Name: "vmhba0:C0:T0:L0",
		PathState: "active", State: "active", IsWorkingPath: types.NewBool(true), Adapter: hbaKey["vmhba0"],
	}})
	for _, hl := range hs.Lun {
		spec, ok := lunSpec[hl.Name]
		if !ok {
			return nil, fmt.Errorf("host %q: LUN %q is not declared in Lun", hs.Name, hl.Name)
		}
		var paths []types.HostMultipathInfoPath
		for t, p := range hl.Path {
			key, ok := hbaKey[p.Hba]
			if !ok {
				return nil, fmt.Errorf("host %q LUN %q: unknown hba %q", hs.Name, hl.Name, p.Hba)
			}
			name := fmt.Sprintf("%s:C0:T%d:L%d", p.Hba, t, l.luns[hl.Name])
			paths = append(paths, types.HostMultipathInfoPath{
				Key:           "key-vim.host.MultipathInfo.Path-" + name,
				Name:          name,
				PathState:     p.State,
				State:         p.State,
				IsWorkingPath: types.NewBool(p.State == "active"),
				Adapter:       key,
			})
		}
		addDisk(hl.Name, false, spec.Vendor, spec.Model, spec.CapacityGB, paths)
	}
	return dev, nil
}

func (l *launcher) tempDir(name string) (string, error) {
	dir, err := ioutil.TempDir("", fmt.Sprintf("govcsim-%s-%s-", l.topo.Datacenter, name))
	if err != nil {
		return "", err
	}
	l.dirs = append(l.dirs, dir)
	return dir, nil
}

func (l *launcher) buildDatastores() error {
	l.dsDir = map[string]string{}
	for i, ds := range l.topo.Datastore {
		if len(ds.Host) == 0 {
			return fmt.Errorf("datastore %q: no Host mounts it", ds.Name)
		}
		first, ok := l.hosts[ds.Host[0]]
		if !ok {
			return fmt.Errorf("datastore %q: unknown host %q", ds.Name, ds.Host[0])
		}
		top, err := l.tempDir(ds.Name)
		if err != nil {
			return err
		}
		dir := filepath.Join(top, ds.Name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			return err
		}
		dss, err := first.ConfigManager().DatastoreSystem(l.ctx)
		if err != nil {
			return err
		}
		var ref types.ManagedObjectReference
		switch ds.Type {
		case "NFS", "NFS41":
			d, err := dss.CreateNasDatastore(l.ctx, types.HostNasVolumeSpec{
				RemoteHost: ds.RemoteHost, RemotePath: ds.RemotePath, LocalPath: dir,
				AccessMode: string(types.HostMountModeReadWrite), Type: ds.Type,
			})
			if err != nil {
				return fmt.Errorf("datastore %q: %w", ds.Name, err)
			}
			ref = d.Reference()
		case "VMFS", "local":
			d, err := dss.CreateLocalDatastore(l.ctx, ds.Name, dir)
			if err != nil {
				return fmt.Errorf("datastore %q: %w", ds.Name, err)
			}
			ref = d.Reference()
		default:
			return fmt.Errorf("datastore %q: unknown type %q", ds.Name, ds.Type)
		}
		if err := l.shapeDatastore(i, ds, ref, dir); err != nil {
			return err
		}
		l.dsDir[ds.Name] = dir
	}
	return nil
}

// shapeDatastore turns the simulator's datastore into what vCenter reports for its type and mounts
// it on every declared host: info (VmfsDatastoreInfo with extents, or NasDatastoreInfo), summary,
// datastore.host, host.datastore and host.config.fileSystemVolume.mountInfo.
func (l *launcher) shapeDatastore(index int, spec DatastoreSpec, ref types.ManagedObjectReference, dir string) error {
	ds := simulator.Map.Get(ref).(*simulator.Datastore)
	const capacity = int64(4) << 40
	ds.Summary.Capacity = capacity
	ds.Summary.FreeSpace = capacity
	uuid := fmt.Sprintf("5f1e%04x-9a3c2b10-7d4e-0050569a%04x", index, index)
	mountPath := "/vmfs/volumes/" + uuid
	var volume types.BaseHostFileSystemVolume

	switch spec.Type {
	case "VMFS", "local":
		extent := spec.Lun
		local := spec.Type == "local"
		if local {
			extent = "mpx.vmhba0:C0:T0:L0"
		} else if _, ok := l.luns[extent]; !ok {
			return fmt.Errorf("datastore %q: LUN %q is not declared in Lun", spec.Name, extent)
		}
		vmfs := &types.HostVmfsVolume{
			HostFileSystemVolume: types.HostFileSystemVolume{Type: "VMFS", Name: spec.Name, Capacity: capacity},
			BlockSizeMb:          1, MaxBlocks: 63963136, MajorVersion: 6, Version: "6.82", Uuid: uuid,
			Extent: []types.HostScsiDiskPartition{{DiskName: extent, Partition: 1}},
			Ssd:    types.NewBool(false), Local: types.NewBool(local),
		}
		ds.Info = &types.VmfsDatastoreInfo{
			DatastoreInfo: types.DatastoreInfo{Name: spec.Name, Url: dir, FreeSpace: capacity,
				MaxFileSize: 62 << 40, MaxVirtualDiskCapacity: 62 << 40, ContainerId: uuid},
			MaxPhysicalRDMFileSize: 64 << 40, MaxVirtualRDMFileSize: 62 << 40, Vmfs: vmfs,
		}
		ds.Summary.Type = "VMFS"
		ds.Summary.MultipleHostAccess = types.NewBool(!local)
		ds.Capability.RawDiskMappingsSupported = true
		volume = vmfs
	default:
		info := ds.Info.(*types.NasDatastoreInfo)
		info.Name = spec.Name
		info.FreeSpace = capacity
		info.Nas.Name = spec.Name
		info.Nas.Capacity = capacity
		mountPath = "/vmfs/volumes/" + uuid[:17]
		ds.Summary.MultipleHostAccess = types.NewBool(len(spec.Host) > 1)
		volume = info.Nas
	}

	ds.Host = nil
	for _, hostName := range spec.Host {
		host, ok := l.hosts[hostName]
		if !ok {
			return fmt.Errorf("datastore %q: unknown host %q", spec.Name, hostName)
		}
		h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
		ds.Host = append(ds.Host, types.DatastoreHostMount{Key: host.Reference(), MountInfo: types.HostMountInfo{
			Path: mountPath, AccessMode: string(types.HostMountModeReadWrite),
			Mounted: types.NewBool(true), Accessible: types.NewBool(true)}})
		h.Config.FileSystemVolume.MountInfo = append(h.Config.FileSystemVolume.MountInfo,
			types.HostFileSystemMountInfo{MountInfo: types.HostMountInfo{Path: mountPath,
				AccessMode: string(types.HostMountModeReadWrite), Mounted: types.NewBool(true),
				Accessible: types.NewBool(true)}, Volume: volume})
		if simulator.FindReference(h.Datastore, ref) == nil {
			h.Datastore = append(h.Datastore, ref)
			dss := simulator.Map.Get(*h.ConfigManager.DatastoreSystem).(*simulator.HostDatastoreSystem)
			dss.Datastore = h.Datastore
			parent := simulator.Map.Get(*h.Parent).(*simulator.ClusterComputeResource)
			if simulator.FindReference(parent.Datastore, ref) == nil {
				parent.Datastore = append(parent.Datastore, ref)
			}
		}
	}
	return nil
}

func (l *launcher) buildMachines() error {
	l.vms = map[string]types.ManagedObjectReference{}
	for _, ms := range l.topo.Machine {
		if err := l.buildMachine(ms); err != nil {
			return fmt.Errorf("machine %q: %w", ms.Name, err)
		}
	}
	return nil
}

func (l *launcher) buildMachine(ms MachineSpec) error {
	ctx := l.ctx
	host, ok := l.hosts[ms.Host]
	if !ok {
		return fmt.Errorf("unknown host %q", ms.Host)
	}
	folder, ok := l.folders[ms.Folder]
	if !ok {
		return fmt.Errorf("unknown folder %q", ms.Folder)
	}
	if len(ms.Disk) == 0 {
		return fmt.Errorf("no disks")
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return err
	}
	cpu, mem := ms.Cpu, ms.MemoryMB
	if cpu == 0 {
		cpu = 1
	}
	if mem == 0 {
		mem = 1024
	}
	firmware, err := machineFirmware(ms)
	if err != nil {
		return err
	}
	if ms.Version != "" && !validVersion(ms.Version) {
		return fmt.Errorf("unknown hardware version %q (want vmx-NN)", ms.Version)
	}
	homeDs := ms.Disk[0].Datastore
	config := types.VirtualMachineConfigSpec{
		Name:                  ms.Name,
		GuestId:               string(types.VirtualMachineGuestOsIdentifierOtherGuest64),
		NumCPUs:               cpu,
		MemoryMB:              mem,
		Firmware:              firmware,
		Version:               ms.Version,
		ChangeTrackingEnabled: types.NewBool(ms.Cbt),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s] %s/%s.vmx", homeDs, ms.Name, ms.Name)},
		// vCenter names the NVRAM file in the "nvram" advanced setting, relative to the VM's directory.
		ExtraConfig: []types.BaseOptionValue{&types.OptionValue{Key: "nvram", Value: ms.Name + ".nvram"}},
	}

	var devices object.VirtualDeviceList
	controllers := map[string]types.BaseVirtualController{}
	controllerFor := func(kind string) (types.BaseVirtualController, error) {
		if kind == "" {
			kind = "pvscsi"
		}
		if c, ok := controllers[kind]; ok {
			return c, nil
		}
		c, err := devices.CreateSCSIController(kind)
		if err != nil {
			return nil, err
		}
		// Each controller needs its own bus number so unit numbers are unique per bus.
		c.(types.BaseVirtualSCSIController).GetVirtualSCSIController().BusNumber = int32(len(controllers))
		devices = append(devices, c)
		controllers[kind] = c.(types.BaseVirtualController)
		return controllers[kind], nil
	}

	var specs []types.BaseVirtualDeviceConfigSpec
	addDisk := func(c types.BaseVirtualController, disk *types.VirtualDisk) {
		devices.AssignController(disk, c)
		devices = append(devices, disk)
		specs = append(specs, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
	}
	for i, d := range ms.Disk {
		// vCenter creates the VM's folder on every datastore holding one of its disks; the simulator
		// only creates it on the home datastore.
		if dir, ok := l.dsDir[d.Datastore]; ok {
			_ = os.MkdirAll(filepath.Join(dir, ms.Name), 0o700)
		}
		c, err := controllerFor(d.Controller)
		if err != nil {
			return err
		}
		file := fmt.Sprintf("[%s] %s/%s.vmdk", d.Datastore, ms.Name, ms.Name)
		if i > 0 {
			file = fmt.Sprintf("[%s] %s/%s_%d.vmdk", d.Datastore, ms.Name, ms.Name, i)
		}
		disk := &types.VirtualDisk{
			CapacityInKB: int64(float64(d.CapacityMB*1024) * l.scale),
			VirtualDevice: types.VirtualDevice{
				Key: int32(2000 + i),
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: file},
					DiskMode:                     string(types.VirtualDiskModePersistent),
					ThinProvisioned:              types.NewBool(true),
				},
			},
		}
		disk.CapacityInBytes = disk.CapacityInKB * 1024
		addDisk(c, disk)
	}
	for i, hba := range ms.Passthrough {
		pci, ok := l.hbaPci[ms.Host+"/"+hba]
		if !ok {
			return fmt.Errorf("passthrough: host %q has no FibreChannel/iSCSI hba %q", ms.Host, hba)
		}
		specs = append(specs, &types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device: &types.VirtualPCIPassthrough{VirtualDevice: types.VirtualDevice{
				Key: int32(13000 + i),
				Backing: &types.VirtualPCIPassthroughDeviceBackingInfo{
					Id: pci, DeviceId: "2261", SystemId: "5f1e0000-0000-0000-0000-0050569a0000", VendorId: 0x1077,
					VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: hba},
				},
				DeviceInfo: &types.Description{Label: fmt.Sprintf("PCI device %d", i), Summary: "QLogic QLE2692 16Gb FC (" + hba + ")"},
			}},
		})
	}
	nics, err := l.nicSpecs(ms)
	if err != nil {
		return err
	}
	specs = append(specs, nics...)
	for _, c := range controllers {
		specs = append([]types.BaseVirtualDeviceConfigSpec{&types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: c.(types.BaseVirtualDevice)}}, specs...)
	}
	config.DeviceChange = specs

	task, err := folder.CreateVM(ctx, config, pool, host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	ref := info.Result.(types.ManagedObjectReference)
	l.vms[ms.Name] = ref
	if err := l.writeNvram(ms, firmware, ref); err != nil {
		return err
	}
	if ms.PowerState == "" || ms.PowerState == "poweredOn" {
		task, err := object.NewVirtualMachine(l.client.Client, ref).PowerOn(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("power on: %w", err)
		}
	}
	return nil
}

func (l *launcher) buildTags() error {
	if len(l.topo.Category) == 0 {
		return nil
	}
	ctx := l.ctx
	rc := rest.NewClient(l.client.Client)
	if err := rc.Login(ctx, l.login); err != nil {
		return fmt.Errorf("rest login: %w", err)
	}
	defer func() { _ = rc.Logout(ctx) }()
	m := tags.NewManager(rc)
	tagIDs := map[string]string{}
	for _, cat := range l.topo.Category {
		card := cat.Cardinality
		if card == "" {
			card = "MULTIPLE"
		}
		cid, err := m.CreateCategory(ctx, &tags.Category{Name: cat.Name, Cardinality: card,
			AssociableTypes: []string{"VirtualMachine"}})
		if err != nil {
			return fmt.Errorf("category %q: %w", cat.Name, err)
		}
		for _, t := range cat.Tag {
			tid, err := m.CreateTag(ctx, &tags.Tag{Name: t, CategoryID: cid})
			if err != nil {
				return fmt.Errorf("tag %q: %w", t, err)
			}
			tagIDs[cat.Name+":"+t] = tid
		}
	}
	for _, ms := range l.topo.Machine {
		for _, t := range ms.Tag {
			tid, ok := tagIDs[t]
			if !ok {
				return fmt.Errorf("machine %q: tag %q is not declared in Category", ms.Name, t)
			}
			if err := m.AttachTag(ctx, tid, l.vms[ms.Name]); err != nil {
				return fmt.Errorf("attach %q to %q: %w", t, ms.Name, err)
			}
		}
	}
	return nil
}
