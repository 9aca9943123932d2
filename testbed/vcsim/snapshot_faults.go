package main

// snapshot_faults.go: the snapshot troubles of real VMs, for the simulator, whose snapshots always succeed and
// whose disks never need consolidation (govmomi 0.24.2 has no ConsolidateVMDisks_Task at all).
//
// Two topology fields of a Machine turn them on, from the state the launcher built:
//
//   - QuiesceFault (a vim25 fault type name, e.g. "ApplicationQuiesceFault" or "ToolsUnavailable"): every
//     CreateSnapshot_Task of that VM with quiesce=true is answered here with a task (the simulator's own Task
//     object, registered so the PropertyCollector and TaskManager.recentTask show it) that ends in error with
//     that fault and the message vCenter gives for it; nothing is snapshotted. Snapshots with quiesce=false go to
//     the simulator unchanged. Powered-off VMs are not special-cased (a client never quiesces them).
//   - ConsolidationNeeded (bool): after each RemoveSnapshot_Task of one of that VM's snapshots that removed it,
//     the VM's runtime.consolidationNeeded becomes true, as when vCenter could not merge the snapshot's delta
//     disks. ConsolidateVMDisks_Task (any VM) is answered here with a task that succeeds and sets the flag false.
//
// Calls answered here first need a live session (asked of the simulator, as cbt.go does); everything else
// reaches the simulator unchanged.

import (
	"encoding/xml"
	"log"
	"net/http"
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// quiesceMessages: what vCenter says with each fault (its localizedMessage); others get the generic one.
var quiesceMessages = map[string]string{
	"ApplicationQuiesceFault": "An error occurred while quiescing the virtual machine. See the virtual machine's " +
		"event log for details.",
	"ToolsUnavailable": "Cannot create a quiesced snapshot because VMware Tools is not running in the virtual machine.",
}

const genericQuiesceMessage = "Cannot create a quiesced snapshot of the virtual machine."

type snapshotFaults struct {
	next        http.Handler
	auth        *cbtEmulator            // only its session check is used
	quiesce     map[string]reflect.Type // VM name -> fault type of its quiesced snapshots
	consolidate map[string]bool         // VM names whose snapshot removals leave consolidation needed
}

// wrapSnapshotFaults intercepts CreateSnapshot_Task, RemoveSnapshot_Task and ConsolidateVMDisks_Task on /sdk as
// the topology's QuiesceFault and ConsolidationNeeded say (see above). A QuiesceFault that names no vim25 fault
// stops the launcher.
func wrapSnapshotFaults(next http.Handler, topo *Topology) http.Handler {
	s := &snapshotFaults{next: next, auth: &cbtEmulator{next: next}, quiesce: map[string]reflect.Type{},
		consolidate: map[string]bool{}}
	faultType := reflect.TypeOf((*types.BaseMethodFault)(nil)).Elem()
	for _, m := range topo.Machine {
		if m.QuiesceFault != "" {
			t, ok := types.TypeFunc()(m.QuiesceFault)
			if !ok || t.Kind() != reflect.Struct || !reflect.PtrTo(t).Implements(faultType) {
				log.Fatalf("machine %q: QuiesceFault %q is not a vim25 fault type", m.Name, m.QuiesceFault)
			}
			s.quiesce[m.Name] = t
		}
		if m.ConsolidationNeeded {
			s.consolidate[m.Name] = true
		}
	}
	return http.HandlerFunc(s.serveHTTP)
}

func (s *snapshotFaults) serveHTTP(w http.ResponseWriter, r *http.Request) {
	method, answered := sdkMethod(w, r, "CreateSnapshot_Task", "RemoveSnapshot_Task", "ConsolidateVMDisks_Task")
	if answered {
		return
	}
	if method == nil {
		s.next.ServeHTTP(w, r)
		return
	}
	switch req := method.Body.(type) {
	case *types.CreateSnapshot_Task:
		vm := s.vm(req.This)
		if vm == nil || !req.Quiesce {
			s.next.ServeHTTP(w, r)
			return
		}
		t, ok := s.quiesce[vm.Name]
		if !ok {
			s.next.ServeHTTP(w, r)
			return
		}
		if !s.auth.authenticated(w, r) {
			return
		}
		s.failQuiesced(w, vm, t)
	case *types.RemoveSnapshot_Task:
		var vm *simulator.VirtualMachine
		if snap, ok := simulator.Map.Get(req.This).(*simulator.VirtualMachineSnapshot); ok {
			vm = s.vm(snap.Vm)
		}
		s.next.ServeHTTP(w, r)
		if vm != nil && s.consolidate[vm.Name] && simulator.Map.Get(req.This) == nil {
			setConsolidationNeeded(vm, true)
		}
	case *types.ConsolidateVMDisks_Task:
		vm := s.vm(req.This)
		if vm == nil {
			s.next.ServeHTTP(w, r)
			return
		}
		if !s.auth.authenticated(w, r) {
			return
		}
		task := simulator.CreateTask(vm, "consolidateVMDisks", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			setConsolidationNeeded(vm, false)
			return nil, nil
		})
		writeSOAP(w, http.StatusOK, &taskResponseXML{
			XMLName: xml.Name{Space: "urn:vim25", Local: "ConsolidateVMDisks_TaskResponse"}, Returnval: task.Run()})
	default:
		s.next.ServeHTTP(w, r)
	}
}

// failQuiesced answers a quiesced CreateSnapshot_Task with a task that failed with a new fault of type t.
func (s *snapshotFaults) failQuiesced(w http.ResponseWriter, vm *simulator.VirtualMachine, t reflect.Type) {
	fault := reflect.New(t).Interface().(types.BaseMethodFault)
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, fault
	})
	ref := task.Run()
	msg, ok := quiesceMessages[t.Name()]
	if !ok {
		msg = genericQuiesceMessage
	}
	// The simulator's message is the Go type name; vCenter's says what went wrong.
	simulator.Map.Update(task, []types.PropertyChange{
		{Name: "info.error", Val: types.LocalizedMethodFault{Fault: fault, LocalizedMessage: msg}}})
	writeSOAP(w, http.StatusOK, &taskResponseXML{
		XMLName: xml.Name{Space: "urn:vim25", Local: "CreateSnapshot_TaskResponse"}, Returnval: ref})
}

// setConsolidationNeeded sets the VM's runtime.consolidationNeeded, as a change of its whole runtime (the
// simulator's property updates cannot assign a bool to the *bool field itself).
func setConsolidationNeeded(vm *simulator.VirtualMachine, needed bool) {
	simulator.Map.WithLock(vm, func() {
		runtime := vm.Runtime
		runtime.ConsolidationNeeded = types.NewBool(needed)
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "runtime", Val: runtime}})
	})
}

func (s *snapshotFaults) vm(ref types.ManagedObjectReference) *simulator.VirtualMachine {
	if ref.Type != "VirtualMachine" {
		return nil
	}
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

// taskResponseXML is the answer of any *_Task method: the task's reference.
type taskResponseXML struct {
	XMLName   xml.Name
	Returnval types.ManagedObjectReference `xml:"returnval"`
}
