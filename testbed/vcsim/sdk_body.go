package main

// sdk_body.go: what every emulator of this launcher does first with a SOAP request: read the body of a POST to
// /sdk and put it back for the handlers after it, and decode the method only when the body names one the emulator
// answers (decoding every request would cost each call of the simulator a second parse).

import (
	"bytes"
	"io/ioutil"
	"net/http"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// sdkBody reads the body of a POST to /sdk and puts it back in r. ok is false when r is not one (the caller
// passes it on as it is) or when the body cannot be read (400 has been written: the caller stops).
func sdkBody(w http.ResponseWriter, r *http.Request) (body []byte, ok bool) {
	if r.Method != http.MethodPost || r.URL.Path != "/sdk" {
		return nil, false
	}
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return nil, false
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	return body, true
}

// sdkMethod is sdkBody, then the decoded SOAP method when the body names one of names (nil otherwise, and for a
// request that is no POST to /sdk). answered is true when the request was answered already (a 400): the caller
// must not pass it on.
func sdkMethod(w http.ResponseWriter, r *http.Request, names ...string) (method *simulator.Method, answered bool) {
	isSDK := r.Method == http.MethodPost && r.URL.Path == "/sdk"
	body, ok := sdkBody(w, r)
	if !ok {
		return nil, isSDK
	}
	for _, name := range names {
		if bytes.Contains(body, []byte(name)) {
			method, _ = simulator.UnmarshalBody(types.TypeFunc(), body)
			break
		}
	}
	return method, false
}
