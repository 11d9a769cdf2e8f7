// Command baggageclaim-driver drives a volume-agent through Concourse's own baggageclaim
// Go client (github.com/concourse/baggageclaim/client), the way a Concourse worker does,
// and checks every answer with the client's own types and error values.
//
// It prints one line per check, "ok NAME" or "FAIL NAME: reason", then a summary, and
// exits 1 when any check failed. Built by tests/tests/baggageclaim_client.rs with the
// shared tools' baggageclaim-client/build.sh (the client and its modules are vendored
// there, not here).
//
//	driver -url http://127.0.0.1:7788 -import-dir DIR [-peer-url http://127.0.0.1:7790]
//
// -import-dir is an empty directory beneath one of the agent's api.import_roots: the
// driver writes its import sources (a directory tree and a .tgz) there.
//
// -peer-url is the local API of a second agent whose P2P listener admits the first
// agent's P2P address: the peer-to-peer checks (Volume.GetStreamInP2pUrl on the second,
// Volume.StreamP2pOut on the first) stream between the two. Without it they are skipped,
// and the summary says so.
//
// The client has no CreateVolumeAsync method of its own: Client.CreateVolume is the
// async create (POST /volumes-async, polls GET /volumes-async/:handle while it answers
// 204, then DELETE /volumes-async/:handle), so every create below goes through it.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"code.cloudfoundry.org/lager"
	"github.com/concourse/baggageclaim"
	"github.com/concourse/baggageclaim/client"
	"github.com/concourse/baggageclaim/volume"
	"github.com/klauspost/compress/zstd"
)

func main() {
	url := flag.String("url", "", "the agent's local API base URL, e.g. http://127.0.0.1:7788")
	importDir := flag.String("import-dir", "", "an empty directory beneath one of the agent's api.import_roots")
	peerURL := flag.String("peer-url", "", "a second agent's local API base URL, for the peer-to-peer checks")
	flag.Parse()
	if *url == "" || *importDir == "" {
		fmt.Fprintln(os.Stderr, "usage: baggageclaim-driver -url URL -import-dir DIR")
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		// Not root (nor, then, the agent): every entry is owned by us, as chown needs root.
		ownUID, ownGID = os.Geteuid(), os.Getegid()
		srcTree[3].uid, srcTree[3].gid = 0, 0
	}
	d := &driver{
		log:       lager.NewLogger("baggageclaim-driver"),
		bc:        client.NewWithHTTPClient(*url, &http.Client{Timeout: 2 * time.Minute}),
		url:       *url,
		importDir: *importDir,
		peerURL:   *peerURL,
		// A prefix of this run's own, so the driver may run again against the same agent.
		prefix: fmt.Sprintf("bcd-%d-", time.Now().UnixNano()),
	}
	d.run()
	if d.peerURL == "" {
		fmt.Println("skipped: the peer-to-peer checks (no -peer-url)")
	}
	fmt.Printf("%d passed, %d failed\n", d.passed, d.failed)
	if d.failed > 0 {
		os.Exit(1)
	}
}

type driver struct {
	log       lager.Logger
	bc        client.Client
	url       string
	importDir string
	peerURL   string
	prefix    string

	passed, failed int

	// Volumes the checks share; a check whose volume could not be made fails on its own.
	empty, src, child, privileged, gone baggageclaim.Volume
}

// The owner of entries that name none (uid 0): root, or whoever runs the driver.
var ownUID, ownGID = 0, 0

// check runs one named check; a panic (e.g. a volume an earlier check could not make)
// is that check's failure, not the driver's.
func (d *driver) check(name string, f func() error) {
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v", p)
			}
		}()
		return f()
	}()
	if err != nil {
		d.failed++
		fmt.Printf("FAIL %s: %v\n", name, err)
		return
	}
	d.passed++
	fmt.Printf("ok %s\n", name)
}

// known runs a check of a deliberate difference from baggageclaim: it asserts what the
// agent does, and its line says so.
func (d *driver) known(name, difference string, f func() error) {
	d.check(name+" (known difference from baggageclaim: "+difference+")", f)
}

func (d *driver) h(name string) string { return d.prefix + name }

// props are the properties every volume of this run carries, plus extra pairs.
func (d *driver) props(kv ...string) baggageclaim.VolumeProperties {
	p := baggageclaim.VolumeProperties{"driver-run": d.prefix}
	for i := 0; i+1 < len(kv); i += 2 {
		p[kv[i]] = kv[i+1]
	}
	return p
}

func (d *driver) create(name string, spec baggageclaim.VolumeSpec) (baggageclaim.Volume, error) {
	v, err := d.bc.CreateVolume(d.log, d.h(name), spec)
	if err != nil {
		return nil, fmt.Errorf("CreateVolume(%s): %w", name, err)
	}
	if v.Handle() != d.h(name) {
		return nil, fmt.Errorf("CreateVolume(%s) answered handle %q", name, v.Handle())
	}
	if v.Path() == "" {
		return nil, fmt.Errorf("CreateVolume(%s) answered an empty path", name)
	}
	return v, nil
}

// The tree streamed into the source volume, and what a stream-out must give back.
var srcTree = []entry{
	{name: "top.txt", body: "top\n", mode: 0o644},
	{name: "dir/", dir: true, mode: 0o755},
	{name: "dir/file.txt", body: "file in dir\n", mode: 0o755},
	{name: "dir/owned.txt", body: "owned by 1000\n", mode: 0o600, uid: 1000, gid: 1000},
	{name: "dir/link", link: "file.txt", mode: 0o777},
}

func (d *driver) run() {
	ctx := context.Background()

	d.check("create-volume-empty-strategy", func() error {
		v, err := d.create("empty", baggageclaim.VolumeSpec{
			Strategy:   baggageclaim.EmptyStrategy{},
			Properties: d.props("kind", "empty"),
		})
		if err != nil {
			return err
		}
		d.empty = v
		if fi, err := os.Stat(v.Path()); err != nil || !fi.IsDir() {
			return fmt.Errorf("Path() %q is not a directory on this host: %v", v.Path(), err)
		}
		return nil
	})

	d.check("create-volume-without-strategy-is-empty", func() error {
		// A nil Strategy: the client sends the empty strategy.
		v, err := d.create("nil-strategy", baggageclaim.VolumeSpec{Properties: d.props()})
		if err != nil {
			return err
		}
		files, err := streamOut(ctx, v, ".", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		if names := regularFiles(files); len(names) != 0 {
			return fmt.Errorf("a new empty volume holds %v", names)
		}
		return nil
	})

	d.check("create-volume-duplicate-handle-fails", func() error {
		_, err := d.bc.CreateVolume(d.log, d.h("empty"), baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}})
		if err == nil {
			return errors.New("a second create of an existing handle succeeded")
		}
		if _, found, err := d.bc.LookupVolume(d.log, d.h("empty")); !found || err != nil {
			return fmt.Errorf("the first volume is gone after the failed create: %v, %v", found, err)
		}
		return nil
	})

	d.check("create-volume-without-handle-gets-a-uuid", func() error {
		v, err := d.bc.CreateVolume(d.log, "", baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}, Properties: d.props("kind", "unnamed")})
		if err != nil {
			return fmt.Errorf("CreateVolume without a handle: %w", err)
		}
		h := v.Handle()
		parts := strings.Split(h, "-")
		if len(h) != 36 || len(parts) != 5 {
			return fmt.Errorf("the generated handle %q is not a UUID", h)
		}
		if _, found, err := d.bc.LookupVolume(d.log, h); !found || err != nil {
			return fmt.Errorf("LookupVolume(%s) = found %v, err %v", h, found, err)
		}
		return v.Destroy()
	})

	d.check("lookup-volume-found", func() error {
		v, found, err := d.bc.LookupVolume(d.log, d.empty.Handle())
		if err != nil || !found {
			return fmt.Errorf("LookupVolume = found %v, err %v", found, err)
		}
		if v.Handle() != d.empty.Handle() || v.Path() != d.empty.Path() {
			return fmt.Errorf("LookupVolume answered %s at %s; created %s at %s", v.Handle(), v.Path(), d.empty.Handle(), d.empty.Path())
		}
		return nil
	})

	d.check("lookup-volume-missing-is-not-found-without-error", func() error {
		v, found, err := d.bc.LookupVolume(d.log, d.h("never-created"))
		if v != nil || found || err != nil {
			return fmt.Errorf("LookupVolume = (%v, %v, %v), want (nil, false, nil)", v, found, err)
		}
		return nil
	})

	d.check("properties-are-the-create-properties", func() error {
		return wantProps(d.empty, d.props("kind", "empty"))
	})

	d.check("set-property-adds-and-overwrites", func() error {
		if err := d.empty.SetProperty("color", "blue"); err != nil {
			return fmt.Errorf("SetProperty: %w", err)
		}
		if err := wantProps(d.empty, d.props("kind", "empty", "color", "blue")); err != nil {
			return err
		}
		if err := d.empty.SetProperty("color", "green"); err != nil {
			return fmt.Errorf("SetProperty again: %w", err)
		}
		return wantProps(d.empty, d.props("kind", "empty", "color", "green"))
	})

	d.check("privileged-is-false-by-default", func() error {
		p, err := d.empty.GetPrivileged()
		if err != nil || p {
			return fmt.Errorf("GetPrivileged = %v, %v; want false, nil", p, err)
		}
		return nil
	})

	d.check("create-volume-privileged", func() error {
		v, err := d.create("privileged", baggageclaim.VolumeSpec{
			Strategy:   baggageclaim.EmptyStrategy{},
			Properties: d.props("kind", "privileged"),
			Privileged: true,
		})
		if err != nil {
			return err
		}
		d.privileged = v
		p, err := v.GetPrivileged()
		if err != nil || !p {
			return fmt.Errorf("GetPrivileged = %v, %v; want true, nil", p, err)
		}
		return nil
	})

	d.check("set-privileged-both-ways", func() error {
		for _, want := range []bool{true, false} {
			if err := d.empty.SetPrivileged(want); err != nil {
				return fmt.Errorf("SetPrivileged(%v): %w", want, err)
			}
			p, err := d.empty.GetPrivileged()
			if err != nil || p != want {
				return fmt.Errorf("after SetPrivileged(%v), GetPrivileged = %v, %v", want, p, err)
			}
		}
		return nil
	})

	d.check("list-volumes-without-filter-has-every-volume", func() error {
		vols, err := d.bc.ListVolumes(d.log, nil)
		if err != nil {
			return fmt.Errorf("ListVolumes: %w", err)
		}
		have := map[string]string{}
		for _, v := range vols {
			have[v.Handle()] = v.Path()
		}
		for _, v := range []baggageclaim.Volume{d.empty, d.privileged} {
			if p, ok := have[v.Handle()]; !ok || p != v.Path() {
				return fmt.Errorf("ListVolumes lacks %s at %s: %v", v.Handle(), v.Path(), vols.Handles())
			}
		}
		return nil
	})

	d.check("list-volumes-with-property-filter", func() error {
		vols, err := d.bc.ListVolumes(d.log, baggageclaim.VolumeProperties{"driver-run": d.prefix, "kind": "empty"})
		if err != nil {
			return fmt.Errorf("ListVolumes: %w", err)
		}
		if got := vols.Handles(); !reflect.DeepEqual(got, []string{d.empty.Handle()}) {
			return fmt.Errorf("ListVolumes(kind=empty) = %v, want [%s]", got, d.empty.Handle())
		}
		vols, err = d.bc.ListVolumes(d.log, baggageclaim.VolumeProperties{"driver-run": d.prefix, "kind": "no-such-kind"})
		if err != nil || len(vols) != 0 {
			return fmt.Errorf("ListVolumes(kind=no-such-kind) = %v, %v; want none", vols.Handles(), err)
		}
		return nil
	})

	d.check("stream-in-gzip-tar", func() error {
		v, err := d.create("src", baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}, Properties: d.props("kind", "src")})
		if err != nil {
			return err
		}
		d.src = v
		return v.StreamIn(ctx, ".", baggageclaim.GzipEncoding, bytes.NewReader(gz(makeTar(srcTree))))
	})

	d.check("stream-in-lands-under-the-volume-path", func() error {
		b, err := os.ReadFile(filepath.Join(d.src.Path(), "dir", "file.txt"))
		if err != nil || string(b) != "file in dir\n" {
			return fmt.Errorf("reading dir/file.txt under Path(): %q, %v", b, err)
		}
		return nil
	})

	d.check("stream-out-volume-root-gzip", func() error {
		files, err := streamOut(ctx, d.src, ".", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "", srcTree)
	})

	d.check("stream-out-directory-gzip", func() error {
		files, err := streamOut(ctx, d.src, "dir", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "dir/", srcTree)
	})

	d.check("stream-out-single-file-gzip", func() error {
		files, err := streamOut(ctx, d.src, "dir/file.txt", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "dir/", []entry{srcTree[2]})
	})

	d.check("stream-in-and-out-zstd", func() error {
		tree := []entry{
			{name: "z/", dir: true, mode: 0o755},
			{name: "z/zstd.txt", body: strings.Repeat("zstd ", 1000), mode: 0o644},
		}
		var buf bytes.Buffer
		w, err := zstd.NewWriter(&buf)
		if err != nil {
			return err
		}
		if _, err := w.Write(makeTar(tree)); err != nil {
			return err
		}
		if err := w.Close(); err != nil {
			return err
		}
		if err := d.src.StreamIn(ctx, "zstd-in", baggageclaim.ZstdEncoding, &buf); err != nil {
			return fmt.Errorf("StreamIn zstd: %w", err)
		}
		files, err := streamOut(ctx, d.src, "zstd-in", baggageclaim.ZstdEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "", tree)
	})

	if d.peerURL != "" {
		d.peerToPeer(ctx)
	}

	d.check("stream-in-to-a-sub-path-makes-its-folders", func() error {
		tree := []entry{{name: "x.txt", body: "deep\n", mode: 0o644}}
		if err := d.src.StreamIn(ctx, "sub/deeper", baggageclaim.GzipEncoding, bytes.NewReader(gz(makeTar(tree)))); err != nil {
			return fmt.Errorf("StreamIn sub/deeper: %w", err)
		}
		files, err := streamOut(ctx, d.src, "sub/deeper/x.txt", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "", tree)
	})

	d.check("stream-out-missing-path-is-err-file-not-found", func() error {
		_, err := d.src.StreamOut(ctx, "no/such/path", baggageclaim.GzipEncoding)
		if err != baggageclaim.ErrFileNotFound {
			return fmt.Errorf("StreamOut of a missing path: %v, want baggageclaim.ErrFileNotFound", err)
		}
		return nil
	})

	d.check("stream-in-owners-by-privilege", func() error {
		if os.Geteuid() != 0 {
			fmt.Println("note stream-in-owners-by-privilege: not root, only the stream-out owners are compared")
		}
		tree := []entry{{name: "root-owned.txt", body: "root\n", mode: 0o644}}
		for _, v := range []baggageclaim.Volume{d.src, d.privileged} {
			if err := v.StreamIn(ctx, ".", baggageclaim.GzipEncoding, bytes.NewReader(gz(makeTar(tree)))); err != nil {
				return fmt.Errorf("StreamIn into %s: %w", v.Handle(), err)
			}
			// Stream-out gives back the owners streamed in, whatever the privilege.
			files, err := streamOut(ctx, v, "root-owned.txt", baggageclaim.GzipEncoding)
			if err != nil {
				return err
			}
			if err := wantTree(files, "", tree); err != nil {
				return fmt.Errorf("%s: %w", v.Handle(), err)
			}
		}
		if os.Geteuid() != 0 {
			return nil
		}
		// On disk, owner 0 of an unprivileged volume is a mapped id; a privileged one keeps 0.
		if uid := ownerOnDisk(filepath.Join(d.privileged.Path(), "root-owned.txt")); uid != 0 {
			return fmt.Errorf("privileged volume: owner %d on disk, want 0", uid)
		}
		if uid := ownerOnDisk(filepath.Join(d.src.Path(), "root-owned.txt")); uid == 0 {
			return errors.New("unprivileged volume: owner 0 on disk, want the mapped id")
		}
		return nil
	})

	d.check("create-volume-cow-child-sees-the-parent-files", func() error {
		v, err := d.create("child", baggageclaim.VolumeSpec{
			Strategy:   baggageclaim.COWStrategy{Parent: d.src},
			Properties: d.props("kind", "child"),
		})
		if err != nil {
			return err
		}
		d.child = v
		if v.Path() == d.src.Path() {
			return errors.New("the child shares its parent's path")
		}
		files, err := streamOut(ctx, v, "dir", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "dir/", srcTree)
	})

	d.check("cow-child-writes-stay-in-the-child", func() error {
		tree := []entry{{name: "child-only.txt", body: "child\n", mode: 0o644}}
		if err := d.child.StreamIn(ctx, ".", baggageclaim.GzipEncoding, bytes.NewReader(gz(makeTar(tree)))); err != nil {
			return fmt.Errorf("StreamIn into the child: %w", err)
		}
		if _, err := streamOut(ctx, d.child, "child-only.txt", baggageclaim.GzipEncoding); err != nil {
			return err
		}
		if _, err := d.src.StreamOut(ctx, "child-only.txt", baggageclaim.GzipEncoding); err != baggageclaim.ErrFileNotFound {
			return fmt.Errorf("the parent's StreamOut of the child's file: %v, want baggageclaim.ErrFileNotFound", err)
		}
		return nil
	})

	d.check("create-volume-cow-of-a-missing-parent-fails", func() error {
		gone, err := d.create("cow-parent-gone", baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}})
		if err != nil {
			return err
		}
		if err := gone.Destroy(); err != nil {
			return fmt.Errorf("Destroy: %w", err)
		}
		if _, err := d.bc.CreateVolume(d.log, d.h("orphan"), baggageclaim.VolumeSpec{Strategy: baggageclaim.COWStrategy{Parent: gone}}); err == nil {
			return errors.New("a copy-on-write child of a destroyed volume was made")
		}
		return wantGone(d, d.h("orphan"))
	})

	// Import sources: a tree (with a symlink) and a .tgz of it, in -import-dir.
	importTree := []entry{
		{name: "hello.txt", body: "hello from the import directory\n", mode: 0o644},
		{name: "sub/", dir: true, mode: 0o755},
		{name: "sub/nested.txt", body: "nested\n", mode: 0o600},
		{name: "sub/link", link: "nested.txt", mode: 0o777},
	}
	treeDir := filepath.Join(d.importDir, "tree")
	tgz := filepath.Join(d.importDir, "image.tgz")

	// Imports `path` as volume `name` and checks it holds importTree.
	importsTheTree := func(name, path string) error {
		v, err := d.create(name, baggageclaim.VolumeSpec{
			Strategy:   baggageclaim.ImportStrategy{Path: path},
			Properties: d.props("kind", "import"),
		})
		if err != nil {
			return err
		}
		files, err := streamOut(ctx, v, ".", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		return wantTree(files, "", importTree)
	}

	d.check("create-volume-import-directory", func() error {
		if err := writeTree(treeDir, importTree); err != nil {
			return err
		}
		return importsTheTree("import-dir", treeDir)
	})

	d.check("create-volume-import-directory-following-symlinks", func() error {
		v, err := d.create("import-follow", baggageclaim.VolumeSpec{
			Strategy:   baggageclaim.ImportStrategy{Path: treeDir, FollowSymlinks: true},
			Properties: d.props("kind", "import"),
		})
		if err != nil {
			return err
		}
		files, err := streamOut(ctx, v, "sub/link", baggageclaim.GzipEncoding)
		if err != nil {
			return err
		}
		f, ok := files["link"]
		if !ok || f.Typeflag != tar.TypeReg || f.body != "nested\n" {
			return fmt.Errorf("sub/link imported with FollowSymlinks is %+v, want a regular file with sub/nested.txt's data", f)
		}
		return nil
	})

	d.check("create-volume-import-tgz", func() error {
		if err := os.WriteFile(tgz, gz(makeTar(importTree)), 0o644); err != nil {
			return err
		}
		return importsTheTree("import-tgz", tgz)
	})

	d.check("create-volume-import-of-a-missing-path-fails", func() error {
		_, err := d.bc.CreateVolume(d.log, d.h("import-missing"), baggageclaim.VolumeSpec{
			Strategy: baggageclaim.ImportStrategy{Path: filepath.Join(d.importDir, "no-such-source")},
		})
		if err == nil {
			return errors.New("an import of a missing path succeeded")
		}
		return wantGone(d, d.h("import-missing"))
	})

	d.check("concurrent-creates-then-bulk-destroy", func() error {
		const n = 8
		errs := make(chan error, n)
		var wg sync.WaitGroup
		var handles []string
		for i := 0; i < n; i++ {
			h := fmt.Sprintf("burst-%d", i)
			handles = append(handles, d.h(h))
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := d.create(h, baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}, Properties: d.props("kind", "burst")})
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				return err
			}
		}
		vols, err := d.bc.ListVolumes(d.log, baggageclaim.VolumeProperties{"driver-run": d.prefix, "kind": "burst"})
		if err != nil {
			return fmt.Errorf("ListVolumes: %w", err)
		}
		got := vols.Handles()
		sort.Strings(got)
		if !reflect.DeepEqual(got, handles) {
			return fmt.Errorf("ListVolumes(kind=burst) = %v, want %v", got, handles)
		}
		if err := d.bc.DestroyVolumes(d.log, handles); err != nil {
			return fmt.Errorf("DestroyVolumes: %w", err)
		}
		for _, h := range handles {
			if err := wantGone(d, h); err != nil {
				return err
			}
		}
		return nil
	})

	d.check("retrying-client-new-talks-to-the-agent", func() error {
		// client.New is what a Concourse worker builds: a retrying transport.
		bc := client.New(d.url, http.DefaultTransport)
		v, found, err := bc.LookupVolume(d.log, d.empty.Handle())
		if err != nil || !found || v.Path() != d.empty.Path() {
			return fmt.Errorf("LookupVolume = %v, %v", found, err)
		}
		return nil
	})

	// A volume object whose volume is gone: what the client answers for each call.
	d.check("destroy-volume", func() error {
		v, err := d.create("gone", baggageclaim.VolumeSpec{Strategy: baggageclaim.EmptyStrategy{}})
		if err != nil {
			return err
		}
		if err := v.Destroy(); err != nil {
			return fmt.Errorf("Destroy: %w", err)
		}
		d.gone = v
		return wantGone(d, v.Handle())
	})

	d.check("calls-on-a-missing-volume-are-err-volume-not-found", func() error {
		calls := map[string]error{
			"SetProperty":   d.gone.SetProperty("k", "v"),
			"SetPrivileged": d.gone.SetPrivileged(true),
			"StreamIn":      d.gone.StreamIn(ctx, ".", baggageclaim.GzipEncoding, bytes.NewReader(gz(makeTar(srcTree[:1])))),
			"Destroy":       d.gone.Destroy(),
		}
		_, calls["GetPrivileged"] = d.gone.GetPrivileged()
		_, calls["StreamOut"] = d.gone.StreamOut(ctx, ".", baggageclaim.GzipEncoding)
		var bad []string
		for name, err := range calls {
			if err != baggageclaim.ErrVolumeNotFound {
				bad = append(bad, fmt.Sprintf("%s: %v", name, err))
			}
		}
		// Properties looks the volume up and answers the volume package's error.
		if _, err := d.gone.Properties(); err != volume.ErrVolumeDoesNotExist {
			bad = append(bad, fmt.Sprintf("Properties: %v (want volume.ErrVolumeDoesNotExist)", err))
		}
		if len(bad) > 0 {
			sort.Strings(bad)
			return fmt.Errorf("want baggageclaim.ErrVolumeNotFound: %s", strings.Join(bad, "; "))
		}
		return nil
	})

	d.check("client-destroy-volume-of-a-missing-handle-is-err-volume-deletion", func() error {
		// baggageclaim answers 404 here, which this client turns into ErrVolumeDeletion.
		if err := d.bc.DestroyVolume(d.log, d.h("never-created")); err != client.ErrVolumeDeletion {
			return fmt.Errorf("DestroyVolume = %v, want client.ErrVolumeDeletion", err)
		}
		return nil
	})

	d.known("destroy-parent-with-a-live-child-is-refused",
		"baggageclaim's DELETE /volumes/:handle removes a parent without looking for copy-on-write children; the agent answers 409 naming them, and the client's Destroy returns that message", func() error {
			err := d.src.Destroy()
			if err == nil {
				return errors.New("the parent of a live child was destroyed")
			}
			if _, found, lerr := d.bc.LookupVolume(d.log, d.src.Handle()); lerr != nil || !found {
				return fmt.Errorf("after the refused Destroy (%v) the parent is found %v, %v", err, found, lerr)
			}
			return nil
		})

	d.check("client-destroy-volume", func() error {
		if err := d.bc.DestroyVolume(d.log, d.privileged.Handle()); err != nil {
			return fmt.Errorf("DestroyVolume: %w", err)
		}
		return wantGone(d, d.privileged.Handle())
	})

	d.check("destroy-volumes-bulk-parent-child-and-unknown-handle", func() error {
		handles := []string{d.src.Handle(), d.h("never-created"), d.child.Handle()}
		if err := d.bc.DestroyVolumes(d.log, handles); err != nil {
			return fmt.Errorf("DestroyVolumes: %w", err)
		}
		for _, h := range []string{d.src.Handle(), d.child.Handle()} {
			if err := wantGone(d, h); err != nil {
				return err
			}
		}
		return nil
	})

	d.check("destroy-volumes-of-the-rest-leaves-none-of-this-run", func() error {
		vols, err := d.bc.ListVolumes(d.log, baggageclaim.VolumeProperties{"driver-run": d.prefix})
		if err != nil {
			return fmt.Errorf("ListVolumes: %w", err)
		}
		if err := d.bc.DestroyVolumes(d.log, vols.Handles()); err != nil {
			return fmt.Errorf("DestroyVolumes: %w", err)
		}
		vols, err = d.bc.ListVolumes(d.log, baggageclaim.VolumeProperties{"driver-run": d.prefix})
		if err != nil || len(vols) != 0 {
			return fmt.Errorf("after DestroyVolumes, ListVolumes = %v, %v", vols.Handles(), err)
		}
		return nil
	})
}

func wantGone(d *driver, handle string) error {
	v, found, err := d.bc.LookupVolume(d.log, handle)
	if found || err != nil {
		return fmt.Errorf("LookupVolume(%s) = %v, %v, %v; want it gone", handle, v, found, err)
	}
	return nil
}

func wantProps(v baggageclaim.Volume, want baggageclaim.VolumeProperties) error {
	got, err := v.Properties()
	if err != nil {
		return fmt.Errorf("Properties: %w", err)
	}
	if !reflect.DeepEqual(got, want) {
		return fmt.Errorf("Properties = %v, want %v", got, want)
	}
	return nil
}

func ownerOnDisk(p string) int64 {
	fi, err := os.Lstat(p)
	if err != nil {
		return -1
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int64(st.Uid)
	}
	return -1
}

type entry struct {
	name, body, link string
	dir              bool
	mode             int64
	uid, gid         int
}

func makeTar(entries []entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		uid, gid := owner(e)
		hdr := &tar.Header{Name: e.name, Mode: e.mode, Uid: uid, Gid: gid, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		switch {
		case e.dir:
			hdr.Typeflag = tar.TypeDir
		case e.link != "":
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, e.link
		default:
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(e.body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			panic(err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			panic(err)
		}
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

func gz(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		panic(err)
	}
	if err := w.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// writeTree makes the entries under dir on this host, as an import source.
func writeTree(dir string, entries []entry) error {
	for _, e := range entries {
		p := filepath.Join(dir, e.name)
		var err error
		switch {
		case e.dir:
			err = os.MkdirAll(p, os.FileMode(e.mode))
		case e.link != "":
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				err = os.Symlink(e.link, p)
			}
		default:
			if err = os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
				err = os.WriteFile(p, []byte(e.body), os.FileMode(e.mode))
			}
			if err == nil {
				err = os.Chmod(p, os.FileMode(e.mode)) // past the umask
			}
		}
		if err != nil {
			return fmt.Errorf("writing the import source %s: %w", p, err)
		}
	}
	return nil
}

// owner is the uid and gid an entry is streamed with.
func owner(e entry) (int, int) {
	if e.uid == 0 && e.gid == 0 {
		return ownUID, ownGID
	}
	return e.uid, e.gid
}

func sameOwner(f file, e entry) bool {
	uid, gid := owner(e)
	return f.Uid == uid && f.Gid == gid
}

type file struct {
	tar.Header
	body string
}

// streamOut calls Volume.StreamOut and reads the tar, keyed by cleaned entry name.
func streamOut(ctx context.Context, v baggageclaim.Volume, p string, enc baggageclaim.Encoding) (map[string]file, error) {
	rc, err := v.StreamOut(ctx, p, enc)
	if err != nil {
		return nil, fmt.Errorf("StreamOut(%s, %s): %w", p, enc, err)
	}
	defer rc.Close()
	var r io.Reader
	switch enc {
	case baggageclaim.GzipEncoding:
		zr, err := gzip.NewReader(rc)
		if err != nil {
			return nil, fmt.Errorf("StreamOut(%s) gzip: %w", p, err)
		}
		r = zr
	case baggageclaim.ZstdEncoding:
		zr, err := zstd.NewReader(rc)
		if err != nil {
			return nil, fmt.Errorf("StreamOut(%s) zstd: %w", p, err)
		}
		defer zr.Close()
		r = zr
	default:
		r = rc
	}
	files := map[string]file{}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return files, nil
		}
		if err != nil {
			return nil, fmt.Errorf("StreamOut(%s) tar: %w", p, err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("StreamOut(%s) tar entry %s: %w", p, hdr.Name, err)
		}
		files[path.Clean(hdr.Name)] = file{Header: *hdr, body: string(body)}
	}
}

func regularFiles(files map[string]file) []string {
	var names []string
	for name, f := range files {
		if f.Typeflag != tar.TypeDir {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// wantTree compares a stream-out with the entries of want beneath prefix (names made
// relative to it): the same names, types, data, link targets, permissions and owners.
func wantTree(files map[string]file, prefix string, want []entry) error {
	var problems []string
	expected := map[string]bool{".": true}
	for _, e := range want {
		if !strings.HasPrefix(e.name, prefix) || e.name == prefix {
			continue
		}
		name := path.Clean(strings.TrimPrefix(e.name, prefix))
		expected[name] = true
		f, ok := files[name]
		if !ok {
			problems = append(problems, name+" is missing")
			continue
		}
		switch {
		case e.dir && f.Typeflag != tar.TypeDir,
			e.link != "" && (f.Typeflag != tar.TypeSymlink || f.Linkname != e.link),
			!e.dir && e.link == "" && f.Typeflag != tar.TypeReg:
			problems = append(problems, fmt.Sprintf("%s has type %q link %q", name, f.Typeflag, f.Linkname))
		case !e.dir && e.link == "" && f.body != e.body:
			problems = append(problems, fmt.Sprintf("%s holds %q, want %q", name, f.body, e.body))
		case e.link == "" && f.Mode&0o7777 != e.mode:
			problems = append(problems, fmt.Sprintf("%s has mode %o, want %o", name, f.Mode&0o7777, e.mode))
		case !sameOwner(f, e):
			uid, gid := owner(e)
			problems = append(problems, fmt.Sprintf("%s is owned by %d:%d, want %d:%d", name, f.Uid, f.Gid, uid, gid))
		}
	}
	for name := range files {
		if !expected[name] {
			problems = append(problems, name+" is not expected")
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// peerToPeer streams the source volume to a volume on the second agent the way the ATC
// does with P2P streaming on: GetStreamInP2pUrl on the destination, StreamP2pOut on the
// source.
func (d *driver) peerToPeer(ctx context.Context) {
	peer := client.NewWithHTTPClient(d.peerURL, &http.Client{Timeout: 2 * time.Minute})
	var dest baggageclaim.Volume
	var streamInURL string

	d.check("p2p-get-stream-in-url", func() error {
		v, err := peer.CreateVolume(d.log, d.h("p2p-dest"), baggageclaim.VolumeSpec{
			Strategy: baggageclaim.EmptyStrategy{}, Properties: d.props("kind", "p2p-dest"),
		})
		if err != nil {
			return fmt.Errorf("CreateVolume on the peer: %w", err)
		}
		dest = v
		u, err := v.GetStreamInP2pUrl(ctx, "copied")
		if err != nil {
			return fmt.Errorf("GetStreamInP2pUrl: %w", err)
		}
		want := "/volumes/" + v.Handle() + "/stream-in?path=copied"
		if !strings.HasPrefix(u, "http://") || !strings.HasSuffix(u, want) {
			return fmt.Errorf("GetStreamInP2pUrl = %q, want http://HOST:PORT%s", u, want)
		}
		if strings.Contains(u, strings.TrimPrefix(d.peerURL, "http://")) {
			return fmt.Errorf("GetStreamInP2pUrl = %q points at the peer's local API, not its P2P listener", u)
		}
		streamInURL = u
		return nil
	})

	d.check("p2p-stream-out-to-the-peer", func() error {
		if err := d.src.StreamP2pOut(ctx, "dir", streamInURL, baggageclaim.GzipEncoding); err != nil {
			return fmt.Errorf("StreamP2pOut: %w", err)
		}
		files, err := streamOut(ctx, dest, "copied", baggageclaim.GzipEncoding)
		if err != nil {
			return fmt.Errorf("reading back from the peer: %w", err)
		}
		return wantTree(files, "dir/", srcTree)
	})

	d.check("p2p-stream-out-of-a-missing-path-is-file-not-found", func() error {
		err := d.src.StreamP2pOut(ctx, "no-such-path", streamInURL, baggageclaim.GzipEncoding)
		if !errors.Is(err, baggageclaim.ErrFileNotFound) {
			return fmt.Errorf("StreamP2pOut(no-such-path) = %v, want ErrFileNotFound", err)
		}
		return nil
	})

	d.known("p2p-stream-into-a-volume-already-read-is-refused",
		"baggageclaim lets any peer write into any volume; the agent's P2P listener takes only volumes nothing has read yet", func() error {
			// dest was streamed out above (read back), so it is closed to peers now.
			err := d.src.StreamP2pOut(ctx, "dir", streamInURL, baggageclaim.GzipEncoding)
			if err == nil {
				return errors.New("a peer wrote into a volume that had already been streamed out")
			}
			if !strings.Contains(err.Error(), "nothing has read yet") {
				return fmt.Errorf("StreamP2pOut error %q does not say why", err)
			}
			return nil
		})
}
