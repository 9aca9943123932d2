package main

// datastore_put.go: datastore HTTP PUT as a thin-provisioned datastore stores the file.
//
// PUT on /folder/<path>?dcPath=<datacenter>&dsName=<datastore> replaces the whole file with the request body, as
// the simulator does (POST does the same but answers 409 Conflict when the file exists). The simulator copies the
// body byte for byte; here every 4 MiB-aligned block of the body that is all zero, and an all-zero tail shorter
// than a block, becomes a hole: the block is skipped and the file is truncated to the body's length at the end,
// as a thin-provisioned datastore (VMFS thin files, NFS) stores it. Reads give back every byte; st_blocks counts
// only the blocks that hold data. The body is streamed through one 4 MiB buffer, never held whole.
//
// Status codes are the simulator's: 200 with an empty body once the file is written, 409 for POST on an existing
// file, 500 when the file cannot be created or written (or the body breaks off). A query whose datacenter or
// datastore this handler cannot tell exactly is left to the simulator, which answers it as before (404 when
// the datastore does not exist). Session checks (sessions.go) run before this handler.

import (
	"bytes"
	"io"
	"log"
	"net/http"
	"os"
	"path"
	"strings"

	"github.com/vmware/govmomi/simulator"
)

const holeBlock = 4 << 20

var zeroBlock = make([]byte, holeBlock) // never written

// wrapDatastorePut answers PUT and POST on /folder/ itself, writing holes; the rest goes to next unchanged.
// dirOf maps (dcPath, dsName) to the datastore's directory.
func wrapDatastorePut(next http.Handler, dirOf func(dcPath, dsName string) (string, bool)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if (r.Method != http.MethodPut && r.Method != http.MethodPost) || !strings.HasPrefix(r.URL.Path, folderPrefix) {
			next.ServeHTTP(w, r)
			return
		}
		q := r.URL.Query()
		dir, ok := dirOf(q.Get("dcPath"), q.Get("dsName"))
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		p := path.Join(dir, strings.TrimPrefix(r.URL.Path, folderPrefix))
		if !strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/") {
			http.Error(w, "the path leaves the datastore", http.StatusBadRequest)
			return
		}
		if r.Method == http.MethodPost {
			if _, err := os.Stat(p); err == nil {
				w.WriteHeader(http.StatusConflict)
				return
			}
		}
		_ = os.MkdirAll(path.Dir(p), 0o700)
		f, err := os.Create(p)
		if err != nil {
			log.Printf("failed to %s '%s': %s", r.Method, p, err)
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		n, err := writeSparse(f, r.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			log.Printf("failed to %s '%s' after %d bytes: %s", r.Method, p, n, err)
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
}

// writeSparse copies body into f (empty, at offset 0) block by block, skipping all-zero 4 MiB-aligned blocks
// and an all-zero tail, then sets f's length to the number of bytes read. It returns that number.
func writeSparse(f *os.File, body io.Reader) (int64, error) {
	buf := make([]byte, holeBlock)
	var offset int64
	for {
		n, err := io.ReadFull(body, buf)
		if n > 0 {
			if !bytes.Equal(buf[:n], zeroBlock[:n]) {
				if _, werr := f.WriteAt(buf[:n], offset); werr != nil {
					return offset, werr
				}
			}
			offset += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return offset, err
		}
	}
	return offset, f.Truncate(offset)
}

// datastoreDir is the directory of datastore dsName in the datacenter dcPath names ("" when there is one
// datacenter, else its name, with or without a leading "/"), read from the simulator's inventory.
func datastoreDir(dcPath, dsName string) (string, bool) {
	if dsName == "" {
		return "", false
	}
	dcs := simulator.Map.All("Datacenter")
	if dcPath == "" && len(dcs) != 1 {
		return "", false
	}
	for _, e := range dcs {
		dc, ok := e.(*simulator.Datacenter)
		if !ok || (dcPath != "" && strings.Trim(dcPath, "/") != dc.Name) {
			continue
		}
		for _, ref := range dc.Datastore {
			if ds, ok := simulator.Map.Get(ref).(*simulator.Datastore); ok && ds.Name == dsName {
				return ds.Info.GetDatastoreInfo().Url, true
			}
		}
	}
	return "", false
}
