package main

// api_facade.go: an "/api" façade over vcsim's "/rest" tagging endpoints.
//
// govmomi 0.24.2's vapi/simulator serves tagging only under /rest/com/vmware/cis/... (bodies wrapped in
// {"create_spec": ...}, answers wrapped in {"value": ...}, "?~action="). The vSphere Automation SDK for
// Python (vmware-vcenter 8.x/9.x) needs "/api". This façade translates every call into the equivalent
// /rest request, runs it in-process on the wrapped handler (so the SAME tag store is used) and translates
// the answer back. Two front ends share one operation table (invoke):
//
//   - POST /api (exact path): vAPI JSON-RPC 2.0, which is what the SDK really sends by default
//     (vmware.vapi.lib.connect.get_requests_connector(msg_protocol='json'), used by create_vsphere_client):
//     {"method":"invoke","params":{"serviceId","operationId","input":{"STRUCTURE":{"operation-input":{..}}},
//     "ctx":{"securityCtx":{..}}}}; typed values in and out, errors as {"ERROR":{"com.vmware.vapi.std.errors.x":..}}.
//   - /api/... REST in vCenter 7.0U2+ shape (unwrapped values, 201 on create, 204 on void, 401/404/400 with
//     {"error_type":"NOT_FOUND","messages":[..]}), per url_template in com/vmware/cis_client.py and
//     com/vmware/cis/tagging_client.py:
//       POST|GET|DELETE /api/session
//       POST|GET /api/cis/tagging/category, GET|DELETE /api/cis/tagging/category/{categoryId}
//       POST|GET /api/cis/tagging/tag, GET|DELETE /api/cis/tagging/tag/{tagId}
//       POST /api/cis/tagging/tag?action=list-tags-for-category
//       POST /api/cis/tagging/tag-association/{tagId}?action=attach|detach|list-attached-objects
//       POST /api/cis/tagging/tag-association?action=list-attached-tags|list-attached-tags-on-objects|
//            list-attached-objects-on-tags
//     (The SDK's own msg_protocol='rest' mode is not served: it expects {"value":..}-wrapped bodies on /api,
//     which a real vCenter does not send either.)
//
// vcsim's /rest login accepts any non-empty user/password, so session create first checks the credentials
// with an in-process SOAP Login/Logout: /api accepts exactly what /sdk accepts (model.Service.Listen.User).

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

const restCIS = "/rest/com/vmware/cis"

// newAPIFacade serves POST /api and /api/... from next's /rest tagging endpoints; other paths go to next.
func newAPIFacade(next http.Handler) *apiFacade {
	return &apiFacade{next: next, sessions: map[string]bool{}}
}

func (f *apiFacade) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/api" && r.Method == http.MethodPost:
		f.serveJSONRPC(w, r)
	case strings.HasPrefix(r.URL.Path, "/api/"):
		f.serveREST(w, r)
	default:
		f.next.ServeHTTP(w, r)
	}
}

type apiFacade struct {
	next http.Handler

	mu       sync.Mutex
	sessions map[string]bool // the /api session ids issued and not deleted
}

// dropSessions deletes every /api session issued (later calls with them are UNAUTHENTICATED); how many.
func (f *apiFacade) dropSessions() int {
	f.mu.Lock()
	ids := f.sessions
	f.sessions = map[string]bool{}
	f.mu.Unlock()
	n := 0
	for id := range ids {
		if f.call(nil, "DELETE", "/session", "", nil, auth{session: id}, "session") == nil {
			n++
		}
	}
	return n
}

// apiError is a vAPI standard error: kind is its error_type ("NOT_FOUND"), status its /api HTTP status.
type apiError struct {
	kind   string
	status int
	msg    string
}

func errOf(kind, msg string) *apiError {
	status := map[string]int{"NOT_FOUND": 404, "OPERATION_NOT_FOUND": 404, "UNAUTHENTICATED": 401,
		"ALREADY_EXISTS": 400, "INVALID_ARGUMENT": 400}[kind]
	if status == 0 {
		status = http.StatusInternalServerError
	}
	return &apiError{kind, status, msg}
}

// obj is a vAPI structure: a plain JSON object on REST, {"STRUCTURE":{name:{..}}} on JSON-RPC.
type obj struct {
	name   string
	fields map[string]interface{}
}

type dynID struct {
	Type string `json:"type"`
	ID   string `json:"id"`
}

func (d dynID) obj() obj {
	return obj{"com.vmware.vapi.std.dynamic_ID", map[string]interface{}{"type": d.Type, "id": d.ID}}
}

// opInput is the union of the inputs of the operations below (field names as in the SDK).
type opInput struct {
	CreateSpec *struct {
		Name            string   `json:"name"`
		Description     string   `json:"description"`
		Cardinality     string   `json:"cardinality,omitempty"`
		AssociableTypes []string `json:"associable_types,omitempty"`
		CategoryID      string   `json:"category_id,omitempty"`
	} `json:"create_spec"`
	CategoryID string   `json:"category_id"`
	TagID      string   `json:"tag_id"`
	ObjectID   *dynID   `json:"object_id"`
	ObjectIDs  []dynID  `json:"object_ids"`
	TagIDs     []string `json:"tag_ids"`
}

// auth is the caller's security context: user+password (session create only) or a session id.
type auth struct{ user, pass, session string }

// rest runs one /rest/com/vmware/cis request in-process and returns its status, unwrapped value and body.
func (f *apiFacade) rest(method, path, action string, body interface{}, a auth) (int, json.RawMessage, []byte) {
	var rd io.Reader = http.NoBody
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	u := restCIS + path
	if action != "" {
		u += "?~action=" + action
	}
	req := httptest.NewRequest(method, u, rd)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("vmware-use-header-authn", "true") // no cookie, token in the body only
	if a.session != "" {
		req.Header.Set("vmware-api-session-id", a.session)
	}
	if a.user != "" {
		req.SetBasicAuth(a.user, a.pass)
	}
	rec := httptest.NewRecorder()
	f.next.ServeHTTP(rec, req)
	var env struct {
		Value json.RawMessage `json:"value"`
	}
	if rec.Code == http.StatusOK {
		_ = json.Unmarshal(rec.Body.Bytes(), &env)
	}
	return rec.Code, env.Value, rec.Body.Bytes()
}

// restErr maps a failed /rest answer to a vAPI error.
func restErr(code int, body []byte, what string) *apiError {
	switch code {
	case http.StatusUnauthorized:
		return errOf("UNAUTHENTICATED", "missing or invalid session")
	case http.StatusNotFound:
		return errOf("NOT_FOUND", what+" not found")
	case http.StatusBadRequest:
		var e struct {
			Type string `json:"type"` // e.g. com.vmware.vapi.std.errors.already_exists
		}
		_ = json.Unmarshal(body, &e)
		if kind := strings.ToUpper(strings.TrimPrefix(e.Type, "com.vmware.vapi.std.errors.")); kind != "" {
			return errOf(kind, what+": "+kind)
		}
		return errOf("INVALID_ARGUMENT", "invalid "+what)
	}
	return errOf("ERROR", what+": simulator answered "+http.StatusText(code))
}

// call runs a /rest request and decodes its value into out (nil: ignore); lists come back non-nil.
func (f *apiFacade) call(out interface{}, method, path, action string, body interface{}, a auth, what string) *apiError {
	code, val, raw := f.rest(method, path, action, body, a)
	if code != http.StatusOK {
		return restErr(code, raw, what)
	}
	if out != nil && len(val) > 0 {
		if err := json.Unmarshal(val, out); err != nil {
			return errOf("ERROR", what+": "+err.Error())
		}
	}
	return nil
}

func id(s string) string { return "/id:" + url.PathEscape(s) }

func strs(l []string) []string {
	if l == nil {
		return []string{}
	}
	return l
}

// validLogin asks the simulator's SOAP SessionManager (in-process Login, then Logout) about user/pass.
func (f *apiFacade) validLogin(user, pass string) bool {
	if user == "" || pass == "" {
		return false
	}
	sm := types.ManagedObjectReference{Type: "SessionManager", Value: "SessionManager"}
	soap := func(method interface{}, cookies []*http.Cookie) *httptest.ResponseRecorder {
		b, _ := xml.Marshal(method)
		env := `<?xml version="1.0" encoding="UTF-8"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body>` +
			strings.Replace(string(b), ">", ` xmlns="urn:vim25">`, 1) + `</Body></Envelope>`
		req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(env))
		req.Header.Set("Content-Type", "text/xml")
		for _, c := range cookies {
			req.AddCookie(c)
		}
		rec := httptest.NewRecorder()
		f.next.ServeHTTP(rec, req)
		return rec
	}
	rec := soap(types.Login{This: sm, UserName: user, Password: pass}, nil)
	if rec.Code != http.StatusOK {
		return false
	}
	soap(types.Logout{This: sm}, rec.Result().Cookies())
	return true
}

func vapiTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z") }

// invoke runs one vAPI operation (service id and operation name as in the SDK) against /rest.
func (f *apiFacade) invoke(svc, op string, in *opInput, a auth) (interface{}, *apiError) {
	const tagging = "com.vmware.cis.tagging."
	var ids []string
	switch svc + "." + op {
	case "com.vmware.cis.session.create": // Session.create: POST /api/session (basic auth) -> token
		if !f.validLogin(a.user, a.pass) {
			return nil, errOf("UNAUTHENTICATED", "invalid user name or password")
		}
		var token string
		e := f.call(&token, "POST", "/session", "", nil, auth{user: a.user, pass: a.pass}, "session")
		if e == nil {
			f.mu.Lock()
			f.sessions[token] = true
			f.mu.Unlock()
		}
		return token, e
	case "com.vmware.cis.session.delete": // DELETE /api/session
		f.mu.Lock()
		delete(f.sessions, a.session)
		f.mu.Unlock()
		return nil, f.call(nil, "DELETE", "/session", "", nil, a, "session")
	case "com.vmware.cis.session.get": // GET /api/session
		var s struct {
			User    string    `json:"user"`
			Created time.Time `json:"created_time"`
			Last    time.Time `json:"last_accessed_time"`
		}
		if e := f.call(&s, "GET", "/session", "", nil, a, "session"); e != nil {
			return nil, e
		}
		return obj{"com.vmware.cis.session.info", map[string]interface{}{
			"user": s.User, "created_time": vapiTime(s.Created), "last_accessed_time": vapiTime(s.Last)}}, nil

	case tagging + "category.create": // POST /api/cis/tagging/category
		var newID string
		if in.CreateSpec == nil {
			return nil, errOf("INVALID_ARGUMENT", "create_spec is required")
		}
		e := f.call(&newID, "POST", "/tagging/category", "", map[string]interface{}{"create_spec": in.CreateSpec}, a, "category")
		return newID, e
	case tagging + "category.get": // GET /api/cis/tagging/category/{categoryId}
		var c struct {
			ID, Name, Description, Cardinality string
			AssociableTypes                    []string `json:"associable_types"`
			UsedBy                             []string `json:"used_by"`
		}
		if e := f.call(&c, "GET", "/tagging/category"+id(in.CategoryID), "", nil, a, "category "+in.CategoryID); e != nil {
			return nil, e
		}
		return obj{tagging + "category_model", map[string]interface{}{"id": c.ID, "name": c.Name,
			"description": c.Description, "cardinality": c.Cardinality,
			"associable_types": strs(c.AssociableTypes), "used_by": strs(c.UsedBy)}}, nil
	case tagging + "category.list": // GET /api/cis/tagging/category
		e := f.call(&ids, "GET", "/tagging/category", "", nil, a, "categories")
		return strs(ids), e
	case tagging + "category.delete": // DELETE /api/cis/tagging/category/{categoryId}
		return nil, f.call(nil, "DELETE", "/tagging/category"+id(in.CategoryID), "", nil, a, "category "+in.CategoryID)

	case tagging + "tag.create": // POST /api/cis/tagging/tag
		var newID string
		if in.CreateSpec == nil {
			return nil, errOf("INVALID_ARGUMENT", "create_spec is required")
		}
		if e := f.call(nil, "GET", "/tagging/category"+id(in.CreateSpec.CategoryID), "", nil, a, "category "+in.CreateSpec.CategoryID); e != nil {
			return nil, e // vcsim would accept a tag in an unknown category
		}
		e := f.call(&newID, "POST", "/tagging/tag", "", map[string]interface{}{"create_spec": in.CreateSpec}, a, "tag")
		return newID, e
	case tagging + "tag.get": // GET /api/cis/tagging/tag/{tagId}
		var t struct {
			ID, Name, Description string
			CategoryID            string   `json:"category_id"`
			UsedBy                []string `json:"used_by"`
		}
		if e := f.call(&t, "GET", "/tagging/tag"+id(in.TagID), "", nil, a, "tag "+in.TagID); e != nil {
			return nil, e
		}
		return obj{tagging + "tag_model", map[string]interface{}{"id": t.ID, "category_id": t.CategoryID,
			"name": t.Name, "description": t.Description, "used_by": strs(t.UsedBy)}}, nil
	case tagging + "tag.list": // GET /api/cis/tagging/tag
		e := f.call(&ids, "GET", "/tagging/tag", "", nil, a, "tags")
		return strs(ids), e
	case tagging + "tag.list_tags_for_category": // POST /api/cis/tagging/tag?action=list-tags-for-category
		if e := f.call(nil, "GET", "/tagging/category"+id(in.CategoryID), "", nil, a, "category "+in.CategoryID); e != nil {
			return nil, e // vcsim would answer [] for an unknown category
		}
		e := f.call(&ids, "POST", "/tagging/tag"+id(in.CategoryID), "list-tags-for-category", nil, a, "category")
		return strs(ids), e
	case tagging + "tag.delete": // DELETE /api/cis/tagging/tag/{tagId}
		return nil, f.call(nil, "DELETE", "/tagging/tag"+id(in.TagID), "", nil, a, "tag "+in.TagID)

	case tagging + "tag_association.attach", tagging + "tag_association.detach": // POST .../tag-association/{tagId}?action=attach|detach
		if in.ObjectID == nil {
			return nil, errOf("INVALID_ARGUMENT", "object_id is required")
		}
		return nil, f.call(nil, "POST", "/tagging/tag-association"+id(in.TagID), op, map[string]interface{}{"object_id": in.ObjectID}, a, "tag "+in.TagID)
	case tagging + "tag_association.list_attached_objects": // POST .../tag-association/{tagId}?action=list-attached-objects
		var objs []dynID
		if e := f.call(&objs, "POST", "/tagging/tag-association"+id(in.TagID), "list-attached-objects", struct{}{}, a, "tag "+in.TagID); e != nil {
			return nil, e
		}
		out := []interface{}{}
		for _, o := range objs {
			out = append(out, o.obj())
		}
		return out, nil
	case tagging + "tag_association.list_attached_tags": // POST .../tag-association?action=list-attached-tags
		if in.ObjectID == nil {
			return nil, errOf("INVALID_ARGUMENT", "object_id is required")
		}
		e := f.call(&ids, "POST", "/tagging/tag-association", "list-attached-tags", map[string]interface{}{"object_id": in.ObjectID}, a, "object")
		return strs(ids), e
	case tagging + "tag_association.list_attached_tags_on_objects": // POST .../tag-association?action=list-attached-tags-on-objects
		var res []struct {
			ObjectID dynID    `json:"object_id"`
			TagIDs   []string `json:"tag_ids"`
		}
		if e := f.call(&res, "POST", "/tagging/tag-association", "list-attached-tags-on-objects", map[string]interface{}{"object_ids": in.ObjectIDs}, a, "objects"); e != nil {
			return nil, e
		}
		out := []interface{}{}
		for _, r := range res {
			out = append(out, obj{tagging + "tag_association.object_to_tags", map[string]interface{}{"object_id": r.ObjectID.obj(), "tag_ids": strs(r.TagIDs)}})
		}
		return out, nil
	case tagging + "tag_association.list_attached_objects_on_tags": // POST .../tag-association?action=list-attached-objects-on-tags
		var res []struct {
			TagID     string  `json:"tag_id"`
			ObjectIDs []dynID `json:"object_ids"`
		}
		if e := f.call(&res, "POST", "/tagging/tag-association", "list-attached-objects-on-tags", map[string]interface{}{"tag_ids": in.TagIDs}, a, "tags"); e != nil {
			return nil, e
		}
		out := []interface{}{}
		for _, r := range res {
			objs := []interface{}{}
			for _, o := range r.ObjectIDs {
				objs = append(objs, o.obj())
			}
			out = append(out, obj{tagging + "tag_association.tag_to_objects", map[string]interface{}{"tag_id": r.TagID, "object_ids": objs}})
		}
		return out, nil
	}
	return nil, errOf("OPERATION_NOT_FOUND", "operation not served by the vcsim /api facade: "+svc+"."+op)
}

// encode renders an operation result: plain JSON for REST, vAPI typed JSON for JSON-RPC.
func encode(v interface{}, typed bool) interface{} {
	switch t := v.(type) {
	case obj:
		m := map[string]interface{}{}
		for k, x := range t.fields {
			m[k] = encode(x, typed)
		}
		if typed {
			return map[string]interface{}{"STRUCTURE": map[string]interface{}{t.name: m}}
		}
		return m
	case []interface{}:
		l := make([]interface{}, len(t))
		for i, x := range t {
			l[i] = encode(x, typed)
		}
		return l
	}
	return v
}

// untype strips vAPI JSON-RPC type wrappers ({"STRUCTURE":{name:{..}}}, {"OPTIONAL":v}, {"SECRET":s}).
func untype(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		if len(t) == 1 {
			for k, x := range t {
				switch k {
				case "STRUCTURE":
					if inner, ok := x.(map[string]interface{}); ok && len(inner) == 1 {
						for _, fields := range inner {
							return untype(fields)
						}
					}
				case "OPTIONAL", "SECRET":
					return untype(x)
				}
			}
		}
		m := map[string]interface{}{}
		for k, x := range t {
			m[k] = untype(x)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = untype(t[i])
		}
	}
	return v
}

func writeJSON(w http.ResponseWriter, status int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func message(e *apiError) map[string]interface{} {
	return map[string]interface{}{"id": "vcsim.api.facade." + strings.ToLower(e.kind), "default_message": e.msg, "args": []string{}}
}

// serveJSONRPC implements POST /api (vAPI JSON-RPC 2.0, method "invoke"); errors travel in a 200 answer.
func (f *apiFacade) serveJSONRPC(w http.ResponseWriter, r *http.Request) {
	var req struct {
		ID     json.RawMessage `json:"id"`
		Params struct {
			ServiceID   string      `json:"serviceId"`
			OperationID string      `json:"operationId"`
			Input       interface{} `json:"input"`
			Ctx         struct {
				SecurityCtx struct {
					UserName  string `json:"userName"`
					Password  string `json:"password"`
					SessionID string `json:"sessionId"`
				} `json:"securityCtx"`
			} `json:"ctx"`
		} `json:"params"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeJSON(w, http.StatusOK, map[string]interface{}{"jsonrpc": "2.0", "id": nil,
			"error": map[string]interface{}{"code": -32700, "message": "Parse error."}})
		return
	}
	var in opInput
	b, _ := json.Marshal(untype(req.Params.Input))
	_ = json.Unmarshal(b, &in)
	sc := req.Params.Ctx.SecurityCtx
	out, e := f.invoke(req.Params.ServiceID, req.Params.OperationID, &in, auth{sc.UserName, sc.Password, sc.SessionID})
	result := map[string]interface{}{"output": encode(out, true)}
	if e != nil {
		result = map[string]interface{}{"error": map[string]interface{}{"ERROR": map[string]interface{}{
			"com.vmware.vapi.std.errors." + strings.ToLower(e.kind): map[string]interface{}{
				"messages":   []interface{}{encode(obj{"com.vmware.vapi.std.localizable_message", message(e)}, true)},
				"error_type": map[string]interface{}{"OPTIONAL": e.kind}}}}}
	}
	writeJSON(w, http.StatusOK, map[string]interface{}{"jsonrpc": "2.0", "id": req.ID, "result": result})
}

// restServices maps /api collection paths to vAPI service ids.
var restServices = map[string]string{
	"/session":                     "com.vmware.cis.session",
	"/cis/tagging/category":        "com.vmware.cis.tagging.category",
	"/cis/tagging/tag":             "com.vmware.cis.tagging.tag",
	"/cis/tagging/tag-association": "com.vmware.cis.tagging.tag_association",
}

// serveREST implements the /api/... REST shape (see the list at the top of this file).
func (f *apiFacade) serveREST(w http.ResponseWriter, r *http.Request) {
	p, itemID := strings.TrimPrefix(r.URL.Path, "/api"), ""
	svc, ok := restServices[p]
	if i := strings.LastIndex(p, "/"); !ok && i > 0 {
		svc, ok = restServices[p[:i]]
		itemID = p[i+1:]
	}
	var in opInput
	op := strings.ReplaceAll(r.URL.Query().Get("action"), "-", "_")
	switch {
	case !ok:
		op = "unknown"
	case op != "":
	case svc == "com.vmware.cis.session":
		op = map[string]string{"POST": "create", "DELETE": "delete", "GET": "get"}[r.Method]
	case itemID == "":
		op = map[string]string{"POST": "create", "GET": "list"}[r.Method]
	default:
		op = map[string]string{"GET": "get", "DELETE": "delete"}[r.Method]
	}
	body, _ := io.ReadAll(r.Body)
	if len(bytes.TrimSpace(body)) > 0 {
		target := interface{}(&in)
		if op == "create" {
			target = &in.CreateSpec // request_body_parameter='create_spec': the body is the spec itself
		}
		if err := json.Unmarshal(body, target); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]interface{}{"error_type": "INVALID_ARGUMENT",
				"messages": []interface{}{message(errOf("INVALID_ARGUMENT", "malformed JSON body"))}})
			return
		}
	}
	if svc == "com.vmware.cis.tagging.category" {
		in.CategoryID = itemID
	} else if itemID != "" {
		in.TagID = itemID
	}
	a := auth{session: r.Header.Get("vmware-api-session-id")}
	a.user, a.pass, _ = r.BasicAuth()
	out, e := f.invoke(svc, op, &in, a)
	switch {
	case e != nil:
		writeJSON(w, e.status, map[string]interface{}{"error_type": e.kind, "messages": []interface{}{message(e)}})
	case op == "create":
		writeJSON(w, http.StatusCreated, out)
	case out == nil:
		w.WriteHeader(http.StatusNoContent)
	default:
		writeJSON(w, http.StatusOK, encode(out, false))
	}
}
