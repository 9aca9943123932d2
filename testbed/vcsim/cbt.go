package main

// cbt.go: Changed Block Tracking for the simulator, which has no QueryChangedDiskAreas.
//
// Changes come from a per-disk change journal that the testbed appends to whenever it writes a disk (the
// counterpart of ESXi's "-ctk.vmdk"): beside "<dir>/<name>-flat.vmdk" lies "<dir>/<name>-ctk.log", one
// "<offset> <length>\n" line per write. Writing the initial images does not journal.
//
// A changeId is "<epoch>/<seq>": epoch names one tracking period of a (VM, disk device key) pair and is made
// anew when ReconfigVM_Task turns changeTrackingEnabled from false to true; seq is the number of journal lines
// at that moment. Three SOAP calls are intercepted on /sdk before the simulator sees them:
//
//   - CreateSnapshot_Task: the VM's disks get their current changeId in backing.changeId (cleared when CBT is
//     off), then the simulator snapshots, copying the config, so the snapshot carries them.
//   - ReconfigVM_Task: passed on; when it turned change tracking on, the VM's epochs are dropped, so the
//     next changeId of each disk starts a new epoch and older changeIds are refused.
//   - QueryChangedDiskAreas: answered here. changeId "*" gives the allocated extents of the flat file
//     (SEEK_DATA/SEEK_HOLE); "E/s" gives the union of journal lines s <= i < S, S being the seq of the
//     snapshot's changeId. Each answer covers at most `window` bytes from startOffset.

import (
	"bytes"
	"crypto/rand"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	defaultCBTWindow = int64(8) << 20
	seekData         = 3 // SEEK_DATA (Linux)
	seekHole         = 4 // SEEK_HOLE (Linux)
)

// cbtEmulator holds the tracking epochs; datastore directories come from dsDir.
type cbtEmulator struct {
	next   http.Handler
	window int64
	dsDir  func(name string) (string, bool)

	mu     sync.Mutex
	epochs map[string]map[int32]string // VM moref value -> device key -> epoch
}

// wrapCBT intercepts CreateSnapshot_Task, ReconfigVM_Task and QueryChangedDiskAreas on /sdk; the rest goes
// to next unchanged.
func wrapCBT(next http.Handler, window int64, dsDir func(string) (string, bool)) http.Handler {
	if window <= 0 {
		window = defaultCBTWindow
	}
	c := &cbtEmulator{next: next, window: window, dsDir: dsDir, epochs: map[string]map[int32]string{}}
	return http.HandlerFunc(c.serveHTTP)
}

func (c *cbtEmulator) serveHTTP(w http.ResponseWriter, r *http.Request) {
	method, answered := sdkMethod(w, r, "QueryChangedDiskAreas", "CreateSnapshot_Task", "ReconfigVM_Task")
	if answered {
		return
	}
	if method == nil {
		c.next.ServeHTTP(w, r)
		return
	}
	switch req := method.Body.(type) {
	case *types.QueryChangedDiskAreas:
		c.queryChangedDiskAreas(w, r, req)
	case *types.CreateSnapshot_Task:
		c.beforeSnapshot(r, req.This)
		c.next.ServeHTTP(w, r)
	case *types.ReconfigVM_Task:
		before, _ := c.trackingOf(req.This)
		c.next.ServeHTTP(w, r)
		if after, ok := c.trackingOf(req.This); ok && after && !before {
			c.mu.Lock()
			delete(c.epochs, req.This.Value)
			c.mu.Unlock()
		}
	default:
		c.next.ServeHTTP(w, r)
	}
}

// authenticated asks the simulator whether r's session cookie names a live session (in-process CurrentTime,
// which needs one). On false the simulator's own fault has been written to w when w is not nil.
func (c *cbtEmulator) authenticated(w http.ResponseWriter, r *http.Request) bool {
	probe := types.CurrentTime{This: types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}}
	b, _ := xml.Marshal(probe)
	env := `<?xml version="1.0" encoding="UTF-8"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body>` +
		strings.Replace(string(b), ">", ` xmlns="urn:vim25">`, 1) + `</Body></Envelope>`
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(env))
	req.Header.Set("Content-Type", "text/xml")
	for _, ck := range r.Cookies() {
		req.AddCookie(ck)
	}
	rec := httptest.NewRecorder()
	c.next.ServeHTTP(rec, req)
	if rec.Code == http.StatusOK {
		return true
	}
	if w != nil {
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = io.Copy(w, rec.Body)
	}
	return false
}

func (c *cbtEmulator) vm(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	if ref.Type != "VirtualMachine" {
		return nil
	}
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

// trackingOf reports the VM's config.changeTrackingEnabled; ok is false when there is no such VM.
func (c *cbtEmulator) trackingOf(ref types.ManagedObjectReference) (enabled, ok bool) {
	vm := c.vm(ref)
	if vm == nil {
		return false, false
	}
	simulator.Map.WithLock(vm, func() {
		enabled = vm.Config != nil && vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	})
	return enabled, true
}

// epoch is the current tracking epoch of the VM's disk, made on first use.
func (c *cbtEmulator) epoch(vm string, key int32) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	disks := c.epochs[vm]
	if disks == nil {
		disks = map[int32]string{}
		c.epochs[vm] = disks
	}
	e, ok := disks[key]
	if !ok {
		e = newEpoch()
		disks[key] = e
	}
	return e
}

// newEpoch is a random id in the form ESXi gives changeIds: "52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx".
func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[0] = 0x52
	var s strings.Builder
	for i, x := range b {
		switch {
		case i == 8:
			s.WriteByte('-')
		case i > 0:
			s.WriteByte(' ')
		}
		fmt.Fprintf(&s, "%02x", x)
	}
	return s.String()
}

// beforeSnapshot stamps every virtual disk of the VM with its current changeId (or clears it when change
// tracking is off). The device list is copied, not edited in place: the simulator's snapshots share the VM's
// device list as it was when they were taken.
func (c *cbtEmulator) beforeSnapshot(r *http.Request, ref types.ManagedObjectReference) {
	vm := c.vm(ref)
	if vm == nil || !c.authenticated(nil, r) {
		return
	}
	simulator.Map.WithLock(vm, func() {
		if vm.Config == nil {
			return
		}
		tracking := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		devices := make([]types.BaseVirtualDevice, len(vm.Config.Hardware.Device))
		changed := false
		for i, dev := range vm.Config.Hardware.Device {
			devices[i] = dev
			disk, ok := dev.(*types.VirtualDisk)
			if !ok {
				continue
			}
			backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			id := ""
			if tracking {
				flat, err := c.flatFile(backing.FileName)
				if err != nil {
					continue
				}
				id = fmt.Sprintf("%s/%d", c.epoch(vm.Self.Value, disk.Key), len(readJournal(journalPath(flat))))
			}
			if backing.ChangeId == id {
				continue
			}
			b := *backing
			b.ChangeId = id
			d := *disk
			d.Backing = &b
			devices[i] = &d
			changed = true
		}
		if changed {
			simulator.Map.Update(vm, []types.PropertyChange{{Name: "config.hardware.device", Val: devices}})
		}
	})
}

// flatFile maps "[ds] vm/name.vmdk" to the local path of "vm/name-flat.vmdk" in the datastore's directory.
func (c *cbtEmulator) flatFile(fileName string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(fileName) || !strings.HasSuffix(p.Path, ".vmdk") {
		return "", fmt.Errorf("%q is not a datastore path of a .vmdk", fileName)
	}
	dir, ok := c.dsDir(p.Datastore)
	if !ok {
		for _, e := range simulator.Map.All("Datastore") {
			if ds, isDs := e.(*simulator.Datastore); isDs && ds.Name == p.Datastore {
				dir, ok = ds.Info.GetDatastoreInfo().Url, true
				break
			}
		}
	}
	if !ok || dir == "" {
		return "", fmt.Errorf("datastore %q has no local directory", p.Datastore)
	}
	rel := strings.TrimSuffix(p.Path, ".vmdk") + "-flat.vmdk"
	return filepath.Join(dir, filepath.FromSlash(rel)), nil
}

// journalPath is "<dir>/<name>-ctk.log" for "<dir>/<name>-flat.vmdk".
func journalPath(flat string) string {
	return strings.TrimSuffix(flat, "-flat.vmdk") + "-ctk.log"
}

type extent struct{ start, length int64 }

// readJournal returns the journal's complete lines in order; a missing journal has none. A trailing line
// without its newline is being written and does not count yet.
func readJournal(path string) []extent {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil
	}
	if i := bytes.LastIndexByte(data, '\n'); i >= 0 {
		data = data[:i+1]
	} else {
		return nil
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	out := make([]extent, 0, len(lines))
	for _, line := range lines {
		var e extent
		if _, err := fmt.Sscanf(line, "%d %d", &e.start, &e.length); err != nil || e.start < 0 || e.length < 0 {
			e = extent{0, math.MaxInt64} // a write of unknown place: taken as anywhere
		}
		out = append(out, e)
	}
	return out
}

// clipMerge clips the extents to [lo, hi), then sorts and merges overlapping and adjacent ones.
func clipMerge(in []extent, lo, hi int64) []types.DiskChangeExtent {
	var xs []extent
	for _, e := range in {
		s, t := e.start, e.start+e.length
		if t < s || t > hi { // overflowing or past the window
			t = hi
		}
		if s < lo {
			s = lo
		}
		if e.length > 0 && s < t {
			xs = append(xs, extent{s, t - s})
		}
	}
	sort.Slice(xs, func(i, j int) bool { return xs[i].start < xs[j].start })
	var out []types.DiskChangeExtent
	for _, e := range xs {
		if n := len(out); n > 0 && e.start <= out[n-1].Start+out[n-1].Length {
			if end := e.start + e.length; end > out[n-1].Start+out[n-1].Length {
				out[n-1].Length = end - out[n-1].Start
			}
			continue
		}
		out = append(out, types.DiskChangeExtent{Start: e.start, Length: e.length})
	}
	return out
}

// allocated lists the data extents of the file in [lo, hi), as SEEK_DATA/SEEK_HOLE report them.
func allocated(path string, lo, hi int64) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []extent
	for off := lo; off < hi; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // no data after off
		}
		if err != nil {
			return nil, err
		}
		if start >= hi {
			break
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, err
		}
		out = append(out, extent{start, end - start})
		off = end
	}
	return out, nil
}

// cbtFault is a SOAP fault for one of QueryChangedDiskAreas' refusals.
type cbtFault struct {
	msg   string
	fault types.BaseMethodFault
}

func invalidArgument(property, format string, a ...interface{}) *cbtFault {
	return &cbtFault{fmt.Sprintf(format, a...), &types.InvalidArgument{InvalidProperty: property}}
}

func fileFault(file, format string, a ...interface{}) *cbtFault {
	return &cbtFault{fmt.Sprintf(format, a...), &types.FileFault{File: file}}
}

// diskOf is what a snapshot's config says of one virtual disk.
type diskOf struct {
	capacity int64
	fileName string
	changeId string
}

func (c *cbtEmulator) queryChangedDiskAreas(w http.ResponseWriter, r *http.Request, req *types.QueryChangedDiskAreas) {
	if !c.authenticated(w, r) {
		return
	}
	info, fault := c.changedDiskAreas(req)
	if fault != nil {
		writeSOAP(w, http.StatusInternalServerError, soapFaultBody{Fault: &soapFaultXML{
			Code: "ServerFaultCode", String: fault.msg, Detail: soapFaultDetail{Fault: faultXML{fault.fault}}}})
		return
	}
	writeSOAP(w, http.StatusOK, &queryChangedDiskAreasResponse{Returnval: *info})
}

func (c *cbtEmulator) changedDiskAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *cbtFault) {
	vm := c.vm(req.This)
	if vm == nil {
		return nil, &cbtFault{fmt.Sprintf("managed object not found: %s", req.This),
			&types.ManagedObjectNotFound{Obj: req.This}}
	}
	tracking, _ := c.trackingOf(req.This)
	if !tracking {
		return nil, fileFault(vm.Name, "change tracking is off for virtual machine %s (%s)", vm.Name, vm.Self.Value)
	}
	if req.Snapshot == nil {
		return nil, invalidArgument("snapshot", "QueryChangedDiskAreas needs a snapshot of %s", vm.Self.Value)
	}
	snap, _ := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
	if snap == nil {
		return nil, &cbtFault{fmt.Sprintf("managed object not found: %s", *req.Snapshot),
			&types.ManagedObjectNotFound{Obj: *req.Snapshot}}
	}
	var disk *diskOf
	var owner types.ManagedObjectReference
	simulator.Map.WithLock(snap, func() {
		owner = snap.Vm
		for _, dev := range snap.Config.Hardware.Device {
			d, ok := dev.(*types.VirtualDisk)
			if !ok || d.Key != req.DeviceKey {
				continue
			}
			disk = &diskOf{capacity: d.CapacityInBytes}
			if disk.capacity == 0 {
				disk.capacity = d.CapacityInKB * 1024
			}
			if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				disk.fileName, disk.changeId = b.FileName, b.ChangeId
			}
		}
	})
	if owner != vm.Self {
		return nil, invalidArgument("snapshot", "snapshot %s is not a snapshot of %s", req.Snapshot.Value, vm.Self.Value)
	}
	if disk == nil {
		return nil, invalidArgument("deviceKey", "snapshot %s has no virtual disk with device key %d",
			req.Snapshot.Value, req.DeviceKey)
	}
	if req.StartOffset < 0 || req.StartOffset >= disk.capacity {
		return nil, invalidArgument("startOffset", "startOffset %d is outside disk %d of %d bytes",
			req.StartOffset, req.DeviceKey, disk.capacity)
	}
	if disk.changeId == "" {
		return nil, fileFault(disk.fileName, "disk %d of snapshot %s has no changeId: change tracking was off "+
			"when the snapshot was taken", req.DeviceKey, req.Snapshot.Value)
	}
	flat, err := c.flatFile(disk.fileName)
	if err != nil {
		return nil, fileFault(disk.fileName, "disk %d: %v", req.DeviceKey, err)
	}
	epoch := c.epoch(vm.Self.Value, req.DeviceKey)
	snapEpoch, snapSeq, ok := parseChangeId(disk.changeId)
	if !ok || snapEpoch != epoch {
		return nil, fileFault(disk.fileName, "change tracking of disk %d was reset after snapshot %s was taken",
			req.DeviceKey, req.Snapshot.Value)
	}

	lo := req.StartOffset
	hi := lo + c.window
	if hi > disk.capacity || hi < lo {
		hi = disk.capacity
	}
	var changed []extent
	if req.ChangeId == "*" {
		changed, err = allocated(flat, lo, hi)
		if err != nil {
			return nil, fileFault(disk.fileName, "disk %d: %v", req.DeviceKey, err)
		}
	} else {
		e, seq, ok := parseChangeId(req.ChangeId)
		if !ok || e != epoch || seq > snapSeq {
			return nil, invalidArgument("changeId", "changeId %q is not valid for disk %d of %s (its changes "+
				"are tracked as %s)", req.ChangeId, req.DeviceKey, vm.Self.Value, disk.changeId)
		}
		journal := readJournal(journalPath(flat))
		if snapSeq > int64(len(journal)) {
			snapSeq = int64(len(journal))
		}
		if seq < snapSeq {
			changed = journal[seq:snapSeq]
		}
	}
	return &types.DiskChangeInfo{StartOffset: lo, Length: hi - lo, ChangedArea: clipMerge(changed, lo, hi)}, nil
}

// parseChangeId splits "<epoch>/<seq>".
func parseChangeId(id string) (epoch string, seq int64, ok bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 {
		return "", 0, false
	}
	seq, err := strconv.ParseInt(id[i+1:], 10, 64)
	if err != nil || seq < 0 {
		return "", 0, false
	}
	return id[:i], seq, true
}

// The SOAP envelope, in the form the simulator itself answers.
type soapEnvelopeXML struct {
	XMLName xml.Name    `xml:"soapenv:Envelope"`
	Enc     string      `xml:"xmlns:soapenc,attr"`
	Env     string      `xml:"xmlns:soapenv,attr"`
	XSD     string      `xml:"xmlns:xsd,attr"`
	XSI     string      `xml:"xmlns:xsi,attr"`
	Body    interface{} `xml:"soapenv:Body"`
}

type queryChangedDiskAreasResponse struct {
	XMLName   xml.Name             `xml:"urn:vim25 QueryChangedDiskAreasResponse"`
	Returnval types.DiskChangeInfo `xml:"returnval"`
}

type soapFaultBody struct {
	Fault *soapFaultXML
}

type soapFaultXML struct {
	XMLName xml.Name        `xml:"soapenv:Fault"`
	Code    string          `xml:"faultcode"`
	String  string          `xml:"faultstring"`
	Detail  soapFaultDetail `xml:"detail"`
}

type soapFaultDetail struct {
	Fault faultXML
}

type faultXML struct{ fault types.BaseMethodFault }

// MarshalXML writes the fault as <{Type}Fault xmlns="urn:vim25" xsi:type="{Type}">.
func (f faultXML) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	kind := fmt.Sprintf("%T", f.fault)
	kind = kind[strings.LastIndexByte(kind, '.')+1:]
	start.Name = xml.Name{Local: kind + "Fault"}
	start.Attr = append(start.Attr, xml.Attr{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"},
		xml.Attr{Name: xml.Name{Local: "xsi:type"}, Value: kind})
	return e.EncodeElement(f.fault, start)
}

func writeSOAP(w http.ResponseWriter, status int, body interface{}) {
	var out bytes.Buffer
	out.WriteString(xml.Header)
	err := xml.NewEncoder(&out).Encode(&soapEnvelopeXML{
		Enc:  "http://schemas.xmlsoap.org/soap/encoding/",
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: body,
	})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(out.Bytes())
}
