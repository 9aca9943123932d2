package main

// privileges.go: effective privileges, and accounts besides the launcher's own, for the simulator.
//
// govmomi 0.24.2's simulator keeps roles and permissions (AddAuthorizationRole, SetEntityPermissions,
// RetrieveEntityPermissions work on real state), but its HasPrivilegeOnEntities grants every privilege to every
// session, and it knows a single login (VCSIM_USERNAME). This file emulates what vCenter does with that state:
//
//   - Accounts: VCSIM_ACCOUNTS, in the environment (never argv), a JSON object {"user": "password", ...}, names
//     the directory's other users. When it is set, Login accepts exactly those and the launcher's own credentials
//     (the simulator is told to take any login, and every other one reaches it with an empty password, which it
//     refuses as an incorrect user name or password). Unset, logins stay the simulator's.
//   - The launcher's user is the administrator, as administrator@vsphere.local is on vCenter: at start it gets
//     the Admin role on the root folder, propagating, through the simulator's SetEntityPermissions (beside the
//     permissions the simulator made itself).
//   - HasPrivilegeOnEntities is answered here, for the user of the session it names (a session logged in through
//     the launcher): on each entity, the privileges of the roles of that user's permissions on the entity itself
//     or else on its nearest ancestor (inventory parent) holding a propagating permission for the user; the
//     Admin role holds every privilege, a user without such a permission none. The call reaches the simulator
//     first, so a caller without a live session gets its NotAuthenticated.
//
// Not emulated: group permissions (there is no directory of group memberships), a VM's resource pool as its
// second parent, privileges on every other call (the simulator lets any session do anything), HasPrivilegeOnEntity,
// HasUserPrivilegeOnEntities and FetchUserPrivilegeOnEntities (the simulator's: everything granted). The
// simulator's SetEntityPermissions replaces an entity's permissions where vCenter updates them per principal: a
// caller sends the entity's whole list, which vCenter takes the same way.

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type privilegeEmulator struct {
	next     http.Handler
	accounts map[string]string // user -> password, the launcher's own included; nil: logins are the simulator's

	mu    sync.Mutex
	users map[string]string // session key -> user name, of every Login the simulator accepted
}

// wrapPrivileges answers HasPrivilegeOnEntities and checks Login on /sdk (see above); svc's Listen.User holds the
// launcher's credentials. It must wrap the simulator's own handler, beneath anything that logs in in-process.
func wrapPrivileges(next http.Handler, svc *simulator.Service) http.Handler {
	user := svc.Listen.User.Username()
	pass, _ := svc.Listen.User.Password()
	p := &privilegeEmulator{next: next, users: map[string]string{}}
	if raw := os.Getenv("VCSIM_ACCOUNTS"); raw != "" {
		var accounts map[string]string
		if err := json.Unmarshal([]byte(raw), &accounts); err != nil {
			log.Fatalf("VCSIM_ACCOUNTS: not a JSON object of user names and passwords: %v", err)
		}
		for name, password := range accounts {
			if name == "" || password == "" {
				log.Fatalf("VCSIM_ACCOUNTS: user %q: empty user name or password", name)
			}
		}
		accounts[user] = pass
		p.accounts = accounts
		listen := *svc.Listen
		listen.User = simulator.DefaultLogin // the simulator takes any non-empty login: Login is checked here
		svc.Listen = &listen
	}
	root := serviceContent().RootFolder
	am := authorizationManager()
	simulator.Map.WithLock(am, func() {
		admin := object.AuthorizationRoleList(am.RoleList).ByName("Admin")
		perms := am.RetrieveEntityPermissions(&types.RetrieveEntityPermissions{Entity: root}).(*methods.RetrieveEntityPermissionsBody).Res.Returnval
		perms = append(perms, types.Permission{Entity: &root, Principal: user, RoleId: admin.RoleId, Propagate: true})
		am.SetEntityPermissions(&types.SetEntityPermissions{Entity: root, Permission: perms})
	})
	return http.HandlerFunc(p.serveHTTP)
}

func serviceContent() types.ServiceContent {
	ref := types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}
	return simulator.Map.Get(ref).(*simulator.ServiceInstance).Content
}

func authorizationManager() *simulator.AuthorizationManager {
	return simulator.Map.Get(*serviceContent().AuthorizationManager).(*simulator.AuthorizationManager)
}

func (p *privilegeEmulator) serveHTTP(w http.ResponseWriter, r *http.Request) {
	method, answered := sdkMethod(w, r, "Login", "HasPrivilegeOnEntities")
	if answered {
		return
	}
	if method == nil {
		p.next.ServeHTTP(w, r)
		return
	}
	switch req := method.Body.(type) {
	case *types.Login:
		p.login(w, r, req)
	case *types.HasPrivilegeOnEntities:
		p.hasPrivilegeOnEntities(w, r, req)
	default:
		p.next.ServeHTTP(w, r)
	}
}

// login passes a Login on (with an empty password when the accounts do not hold its credentials) and records
// the session the simulator made for the user.
func (p *privilegeEmulator) login(w http.ResponseWriter, r *http.Request, req *types.Login) {
	if p.accounts != nil {
		if want, ok := p.accounts[req.UserName]; !ok || want != req.Password {
			refused := *req
			refused.Password = ""
			r = withBody(r, soapEnvelope(&refused))
		}
	}
	rec := httptest.NewRecorder()
	p.next.ServeHTTP(rec, r)
	if rec.Code == http.StatusOK {
		for _, c := range rec.Result().Cookies() {
			if c.Name == soap.SessionCookieName {
				p.mu.Lock()
				p.users[c.Value] = req.UserName
				p.mu.Unlock()
			}
		}
	}
	copyResponse(w, rec)
}

func (p *privilegeEmulator) hasPrivilegeOnEntities(w http.ResponseWriter, r *http.Request,
	req *types.HasPrivilegeOnEntities) {
	rec := httptest.NewRecorder()
	p.next.ServeHTTP(rec, r) // the simulator authenticates the caller; its answer (all granted) is not used
	if rec.Code != http.StatusOK {
		copyResponse(w, rec)
		return
	}
	p.mu.Lock()
	user, ok := p.users[req.SessionId]
	p.mu.Unlock()
	if !ok {
		writeFault(w, fmt.Sprintf("no session %q", req.SessionId), &types.InvalidArgument{InvalidProperty: "sessionId"})
		return
	}
	out := []types.EntityPrivilege{}
	for _, e := range req.Entity {
		held, all, found := effectivePrivileges(user, e)
		if !found {
			writeFault(w, fmt.Sprintf("managed object not found: %s", e), &types.ManagedObjectNotFound{Obj: e})
			return
		}
		priv := types.EntityPrivilege{Entity: e}
		for _, id := range req.PrivId {
			priv.PrivAvailability = append(priv.PrivAvailability,
				types.PrivilegeAvailability{PrivId: id, IsGranted: all || held[id]})
		}
		out = append(out, priv)
	}
	writeSOAP(w, http.StatusOK, &hasPrivilegeOnEntitiesResponse{Returnval: out})
}

// effectivePrivileges is what user holds on ref (all: the Admin role); found is false when ref is no entity.
func effectivePrivileges(user string, ref types.ManagedObjectReference) (held map[string]bool, all, found bool) {
	am := authorizationManager()
	roles := map[int32][]string{}
	var admin int32
	simulator.Map.WithLock(am, func() {
		for _, role := range am.RoleList {
			roles[role.RoleId] = role.Privilege
		}
		admin = object.AuthorizationRoleList(am.RoleList).ByName("Admin").RoleId
	})
	held = map[string]bool{}
	for own := true; ; own = false {
		obj := simulator.Map.Get(ref)
		e, ok := obj.(mo.Entity)
		if !ok {
			return held, false, !own
		}
		var perms []types.Permission
		simulator.Map.WithLock(am, func() {
			perms = am.RetrieveEntityPermissions(&types.RetrieveEntityPermissions{Entity: ref}).(*methods.RetrieveEntityPermissionsBody).Res.Returnval
		})
		matched := false
		for _, perm := range perms {
			if perm.Group || !strings.EqualFold(perm.Principal, user) || (!own && !perm.Propagate) {
				continue
			}
			matched = true
			all = all || perm.RoleId == admin
			for _, id := range roles[perm.RoleId] {
				held[id] = true
			}
		}
		if matched {
			return held, all, true
		}
		var parent *types.ManagedObjectReference
		simulator.Map.WithLock(obj, func() { parent = e.Entity().Parent })
		if parent == nil {
			return held, false, true
		}
		ref = *parent
	}
}

type hasPrivilegeOnEntitiesResponse struct {
	XMLName   xml.Name                `xml:"urn:vim25 HasPrivilegeOnEntitiesResponse"`
	Returnval []types.EntityPrivilege `xml:"returnval"`
}

func writeFault(w http.ResponseWriter, msg string, fault types.BaseMethodFault) {
	writeSOAP(w, http.StatusInternalServerError, soapFaultBody{Fault: &soapFaultXML{
		Code: "ServerFaultCode", String: msg, Detail: soapFaultDetail{Fault: faultXML{fault}}}})
}

func soapEnvelope(method interface{}) string {
	b, _ := xml.Marshal(method)
	return `<?xml version="1.0" encoding="UTF-8"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body>` +
		strings.Replace(string(b), ">", ` xmlns="urn:vim25">`, 1) + `</Body></Envelope>`
}

func withBody(r *http.Request, body string) *http.Request {
	out := r.Clone(r.Context())
	out.Body = ioutil.NopCloser(strings.NewReader(body))
	out.ContentLength = int64(len(body))
	return out
}

func copyResponse(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = io.Copy(w, rec.Body)
}
