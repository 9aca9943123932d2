package main

// sessions.go: sessions as vCenter keeps them, where the simulator is laxer, and a way to lose them all.
//
//   - A property read (RetrieveProperties, RetrievePropertiesEx, ContinueRetrievePropertiesEx) without a live
//     session is refused with NotAuthenticated, as vCenter does; the simulator would answer it.
//   - Datastore HTTP (/folder/...) needs the cookie of a live session, as on vCenter: 401 otherwise (the
//     simulator serves it to anyone). Turned off with -datastore-auth=false.
//   - dropSessions ends every SOAP session (TerminateSession, as a vCenter restart or an administrator does)
//     and every /api session; the launcher calls it on SIGUSR1.

import (
	"bytes"
	"context"
	"encoding/xml"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

var propertyReads = [][]byte{[]byte("RetrieveProperties"), []byte("ContinueRetrievePropertiesEx")}

// wrapSessions guards next's property reads and, when datastoreAuth is set, its /folder/ endpoint.
func wrapSessions(next http.Handler, datastoreAuth bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/sdk":
			body, ok := sdkBody(w, r)
			if !ok {
				return
			}
			for _, name := range propertyReads {
				if bytes.Contains(body, name) {
					if !liveSession(next, w, r) {
						return
					}
					break
				}
			}
		case datastoreAuth && strings.HasPrefix(r.URL.Path, folderPrefix):
			if !liveSession(next, nil, r) {
				http.Error(w, "a live vCenter session is required", http.StatusUnauthorized)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

const folderPrefix = "/folder/"

// liveSession asks the simulator whether r's session cookie names a live session (an in-process CurrentTime,
// which needs one). When it does not and w is not nil, the simulator's own fault (NotAuthenticated) is written
// to w.
func liveSession(next http.Handler, w http.ResponseWriter, r *http.Request) bool {
	if _, err := r.Cookie("vmware_soap_session"); err != nil && w == nil {
		return false
	}
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
	next.ServeHTTP(rec, req)
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

// dropSessions terminates every SOAP session but the one it logs in with itself (then logged out) and deletes
// every /api session the façade issued. It returns how many of each it ended.
func dropSessions(ctx context.Context, server *url.URL, facade *apiFacade) (soap int, api int, err error) {
	api = facade.dropSessions()
	c, err := govmomi.NewClient(ctx, server, true)
	if err != nil {
		return 0, api, err
	}
	defer func() { _ = c.Logout(ctx) }()
	m := session.NewManager(c.Client)
	own, err := m.UserSession(ctx)
	if err != nil {
		return 0, api, err
	}
	var sm mo.SessionManager
	if err := property.DefaultCollector(c.Client).RetrieveOne(ctx, *c.ServiceContent.SessionManager,
		[]string{"sessionList"}, &sm); err != nil {
		return 0, api, err
	}
	var keys []string
	for _, s := range sm.SessionList {
		if own == nil || s.Key != own.Key {
			keys = append(keys, s.Key)
		}
	}
	if len(keys) > 0 {
		if err := m.TerminateSession(ctx, keys); err != nil {
			return 0, api, err
		}
	}
	return len(keys), api, nil
}
