use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom as StdSeek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

fn n(s: &str) -> NameBuf {
    NameBuf::new(s).expect("valid name")
}

fn tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    let r = t.path();
    fs::create_dir_all(r.join("a/b/c")).expect("mkdir");
    fs::write(r.join("a/f"), b"hello").expect("write");
    fs::write(r.join("a/b/c/g"), b"deep").expect("write");
    std::os::unix::fs::symlink("/etc", r.join("a/etc-link")).expect("symlink");
    t
}

#[test]
fn open_dir_refuses_a_symlink_to_a_directory() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open root");
    let a = root.open_dir(n("a").as_name()).expect("open a");
    let e = a
        .open_dir(n("etc-link").as_name())
        .expect_err("followed a symlink");
    assert!(e.is_wrong_kind(), "{e}");
    assert_eq!(e.path, Path::new("a/etc-link"));
    assert!(e.to_string().contains("a/etc-link"), "{e}");
}

#[test]
fn open_root_refuses_a_symlink_as_last_component() {
    let t = tree();
    let link = t.path().join("root-link");
    std::os::unix::fs::symlink(t.path().join("a"), &link).expect("symlink");
    assert!(Dir::open_root(&link).expect_err("followed").is_wrong_kind());
    // The operator's import path is followed.
    Dir::open_host(&link).expect("host path followed");
}

#[test]
fn open_file_refuses_fifos_devices_and_links_without_blocking() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open root");
    root.mknod(n("fifo").as_name(), Kind::Fifo, 0o644, 0)
        .expect("mkfifo");
    let e = root
        .open_file(n("fifo").as_name())
        .expect_err("opened a fifo");
    assert!(e.is_wrong_kind(), "{e}");
    root.symlink(n("l").as_name(), "a/f".as_ref())
        .expect("symlink");
    let e = root
        .open_file(n("l").as_name())
        .expect_err("followed a link");
    assert!(e.is(Errno::LOOP), "{e}");
    let a = root.open_dir(n("a").as_name()).expect("a");
    let (mut f, meta) = a.open_file(n("f").as_name()).expect("regular file");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read");
    assert_eq!((s.as_str(), meta.size, meta.kind), ("hello", 5, Kind::File));
}

#[test]
fn listing_returns_every_entry_over_many_batches() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut want = BTreeSet::new();
    for i in 0..3000 {
        let name = format!("entry-with-a-longish-name-{i:05}");
        fs::write(t.path().join(&name), b"").expect("write");
        want.insert(name);
    }
    let root = Dir::open_root(t.path()).expect("open");
    let mut listing = Listing::with_capacity(4096);
    let mut got = BTreeSet::new();
    let mut batches = 0;
    while root.read_batch(&mut listing).expect("batch") {
        batches += 1;
        for (name, kind) in listing.iter() {
            assert_eq!(kind, Kind::File);
            got.insert(name.as_os_str().to_string_lossy().into_owned());
        }
    }
    assert!(batches > 1, "one batch only");
    assert_eq!(got, want);
    assert_eq!(root.entries().expect("entries").len(), 3000);
}

struct Collect(Vec<(String, Kind)>, usize);

impl Visitor for Collect {
    type Error = FsxError;
    fn entry(&mut self, dir: &Dir, name: Name<'_>, kind: Kind) -> Result<Descend> {
        self.0
            .push((dir.rel_of(name).to_string_lossy().into_owned(), kind));
        Ok(Descend::Yes)
    }
    fn leave(&mut self, _dir: &Dir) -> Result<()> {
        self.1 += 1;
        Ok(())
    }
}

#[test]
fn walk_visits_everything_once_and_never_follows_links() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open");
    let mut c = Collect(Vec::new(), 0);
    walk(&root, &mut c).expect("walk");
    c.0.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<_> = c.0.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["a", "a/b", "a/b/c", "a/b/c/g", "a/etc-link", "a/f"],
        "{c:?}",
        c = c.0
    );
    assert!(c.0.contains(&("a/etc-link".into(), Kind::Symlink)));
    assert_eq!(c.1, 4, "leave once per directory, root included");
}

#[test]
fn walk_stops_at_the_depth_bound() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut p = t.path().to_path_buf();
    for _ in 0..MAX_DEPTH + 2 {
        p.push("d");
    }
    fs::create_dir_all(&p).expect("deep tree");
    let root = Dir::open_root(t.path()).expect("open");
    let e = walk(&root, &mut Collect(Vec::new(), 0)).expect_err("went too deep");
    assert!(e.to_string().contains("deeper than"), "{e}");
}

#[test]
fn open_dir_refuses_a_mount_point() {
    let t = tree();
    let target = t.path().join("a/b");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&target)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here (not root, or no mount permission)");
        return;
    }
    let root = Dir::open_root(t.path()).expect("open");
    let a = root.open_dir(n("a").as_name()).expect("a");
    let e = a.open_dir(n("b").as_name()).expect_err("crossed a mount");
    let _ = std::process::Command::new("umount").arg(&target).status();
    assert!(e.is_mount_point(), "{e}");
    assert!(e.to_string().contains("unmount it"), "{e}");
}

#[test]
fn node_changes_the_link_itself_never_its_target() {
    let t = tree();
    let target = t.path().join("a/f");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).expect("chmod");
    let root = Dir::open_root(t.path()).expect("open");
    root.symlink(n("l").as_name(), target.as_os_str())
        .expect("symlink");
    let node = root.open_node(n("l").as_name()).expect("node");
    assert_eq!(node.meta().kind, Kind::Symlink);
    assert!(node
        .chmod(0o777)
        .expect_err("chmod on link")
        .is_wrong_kind());
    if rustix::process::geteuid().is_root() {
        node.chown(1234, 4321).expect("chown link");
        let link = fs::symlink_metadata(t.path().join("l")).expect("lstat");
        assert_eq!((link.uid(), link.gid()), (1234, 4321));
        assert_eq!(fs::metadata(&target).expect("stat").uid(), 0);
    }
    assert_eq!(fs::metadata(&target).expect("stat").mode() & 0o7777, 0o640);
    let file = root
        .open_dir(n("a").as_name())
        .expect("a")
        .open_node(n("f").as_name())
        .expect("node");
    file.chmod(0o4755).expect("chmod file");
    assert_eq!(fs::metadata(&target).expect("stat").mode() & 0o7777, 0o4755);
}

#[test]
fn copy_data_keeps_holes_and_bytes() {
    let t = tempfile::tempdir().expect("tempdir");
    let src_path = t.path().join("src");
    {
        let mut f = fs::File::create(&src_path).expect("create");
        f.write_all(b"head").expect("write");
        f.seek(StdSeek::Start(64 << 20)).expect("seek");
        f.write_all(b"middle").expect("write");
        f.set_len(256 << 20).expect("trailing hole");
    }
    let root = Dir::open_root(t.path()).expect("open");
    let (src, meta) = root.open_file(n("src").as_name()).expect("open src");
    for (name, reflink) in [("dst-plain", false), ("dst-reflink", true)] {
        let dst = root.create_file(n(name).as_name(), 0o600).expect("create");
        copy_data(&src, &dst, reflink).expect("copy");
        drop(dst);
        let got = fs::metadata(t.path().join(name)).expect("stat");
        assert_eq!(got.len(), meta.size);
        assert!(
            got.blocks() * 512 < 8 << 20,
            "{name}: {} bytes allocated for a sparse file",
            got.blocks() * 512
        );
        let bytes = fs::read(t.path().join(name)).expect("read");
        assert_eq!(&bytes[..4], b"head");
        assert_eq!(&bytes[64 << 20..(64 << 20) + 6], b"middle");
        assert!(bytes[4..64 << 20].iter().all(|&b| b == 0));
    }
}

#[test]
fn errors_name_the_entry_and_the_operation() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open");
    let a = root.open_dir(n("a").as_name()).expect("a");
    let e = a.mkdir(n("f").as_name(), 0o755).expect_err("exists");
    assert_eq!(e.to_string(), format!("making directory a/f: {}", e.source));
    let e = e.under(Path::new("/vol"));
    assert_eq!(e.path, Path::new("/vol/a/f"));
}

#[test]
fn try_clone_is_the_same_directory_with_its_place_and_path() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open");
    let a = root.open_dir(n("a").as_name()).expect("a");
    let b = a.try_clone().expect("clone");
    drop(a);
    assert_eq!(b.rel(), Path::new("a"));
    assert_eq!(b.placement(), root.placement());
    let names: BTreeSet<_> = b
        .entries()
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([n("b"), n("etc-link"), n("f")]),
        "the clone lists the directory it was made from"
    );
    // Still refuses what the original refuses, with paths from the same root.
    let e = b.open_dir(n("etc-link").as_name()).expect_err("followed");
    assert!(e.is_wrong_kind(), "{e}");
    assert_eq!(e.path, Path::new("a/etc-link"));
}

#[test]
fn chmod_fd_sets_set_id_bits_that_chown_fd_cleared() {
    let t = tree();
    let root = Dir::open_root(t.path()).expect("open");
    let f = root.create_file(n("s").as_name(), 0o600).expect("create");
    chmod_fd(f.as_fd(), 0o104755).expect("chmod");
    let mode = || fs::metadata(t.path().join("s")).expect("stat").mode();
    // Only the permission, set-id and sticky bits are taken.
    assert_eq!(mode() & 0o7777, 0o4755);
    if rustix::process::geteuid().is_root() {
        chown_fd(f.as_fd(), 1234, 4321).expect("chown");
        let m = fs::metadata(t.path().join("s")).expect("stat");
        assert_eq!((m.uid(), m.gid()), (1234, 4321));
        assert_eq!(m.mode() & 0o4000, 0, "chown keeps the set-uid bit");
        chmod_fd(f.as_fd(), 0o4755).expect("chmod again");
        assert_eq!(mode() & 0o7777, 0o4755);
    }
    // On a directory handle too.
    let a = root.open_dir(n("a").as_name()).expect("a");
    chmod_fd(a.as_fd(), 0o1750).expect("chmod dir");
    assert_eq!(
        fs::metadata(t.path().join("a")).expect("stat").mode() & 0o7777,
        0o1750
    );
}
