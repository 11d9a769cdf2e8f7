use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;

use super::*;

/// One entry of a hand-made tar: names are written raw, so `..` and `/x` can be tested.
#[derive(Clone, Debug)]
enum E {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, String),
    HardLink(String, String),
    /// A fifo with this mode (special files need no privilege to make when they are fifos).
    Fifo(String, u32),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            E::File(n, data) => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(data.len() as u64);
                append(&mut b, &mut h, n.as_bytes(), None, &data[..]).expect("append");
            }
            E::Dir(n) => {
                h.set_entry_type(EntryType::Directory);
                h.set_mode(0o755);
                append(&mut b, &mut h, n.as_bytes(), None, io::empty()).expect("append");
            }
            E::Fifo(n, mode) => {
                h.set_entry_type(EntryType::Fifo);
                h.set_mode(*mode);
                append(&mut b, &mut h, n.as_bytes(), None, io::empty()).expect("append");
            }
            E::Symlink(n, t) | E::HardLink(n, t) => {
                let kind = match e {
                    E::Symlink(..) => EntryType::Symlink,
                    _ => EntryType::Link,
                };
                h.set_entry_type(kind);
                append(
                    &mut b,
                    &mut h,
                    n.as_bytes(),
                    Some(t.as_bytes()),
                    io::empty(),
                )
                .expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// A temp dir holding `vol/` (the extraction root) and `outside/` (must stay empty).
fn sandbox() -> (tempfile::TempDir, OwnedFd) {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("vol")).expect("vol");
    fs::create_dir(dir.path().join("outside")).expect("outside");
    let fd = open_dir(&dir.path().join("vol")).expect("open vol");
    (dir, fd)
}

fn assert_nothing_outside(dir: &Path) {
    let mut top: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        ["outside", "vol"],
        "something was written beside the volume"
    );
    assert_eq!(
        fs::read_dir(dir.join("outside"))
            .expect("list outside")
            .count(),
        0,
        "something was written outside the volume"
    );
}

fn refused(entries: &[E]) -> ArchiveError {
    let (dir, fd) = sandbox();
    let err = extract(&fd, &tar_of(entries)[..], IdMap::IDENTITY).expect_err("must refuse");
    assert_nothing_outside(dir.path());
    err
}

#[test]
fn refuses_parent_dir_entry_names() {
    let e = refused(&[E::File("../outside/x".into(), b"x".to_vec())]);
    assert!(matches!(e, ArchiveError::Unsafe { .. }), "{e}");
    let e = refused(&[E::File("a/../../outside/x".into(), b"x".to_vec())]);
    assert!(matches!(e, ArchiveError::Unsafe { .. }), "{e}");
}

#[test]
fn refuses_absolute_entry_names() {
    let e = refused(&[E::File("/etc/x".into(), b"x".to_vec())]);
    assert!(e.to_string().contains("is absolute"), "{e}");
}

#[test]
fn refuses_relative_symlink_climbing_out() {
    let e = refused(&[
        E::Dir("a".into()),
        E::Symlink("a/out".into(), "../../outside".into()),
    ]);
    assert!(e.to_string().contains("symlink pointing outside"), "{e}");
}

#[test]
fn never_writes_through_a_symlink_even_an_absolute_one() {
    let (dir, fd) = sandbox();
    let outside = dir.path().join("outside");
    let entries = [
        E::Symlink("abs".into(), outside.to_string_lossy().into_owned()),
        E::File("abs/x".into(), b"x".to_vec()),
    ];
    let e = extract(&fd, &tar_of(&entries)[..], IdMap::IDENTITY).expect_err("refused");
    assert!(e.to_string().contains("through a symlink"), "{e}");
    assert_nothing_outside(dir.path());
}

#[test]
fn refuses_hard_link_to_a_name_outside() {
    let e = refused(&[E::HardLink("h".into(), "../outside/secret".into())]);
    assert!(e.to_string().contains("hard link"), "{e}");
    let e = refused(&[E::HardLink("h".into(), "/etc/passwd".into())]);
    assert!(e.to_string().contains("hard link"), "{e}");
}

#[test]
fn replaces_an_existing_symlink_instead_of_writing_through_it() {
    let (dir, fd) = sandbox();
    let outside = dir.path().join("outside").join("victim");
    std::os::unix::fs::symlink(&outside, dir.path().join("vol/f")).expect("symlink");
    extract(
        &fd,
        &tar_of(&[E::File("f".into(), b"new".to_vec())])[..],
        IdMap::IDENTITY,
    )
    .expect("extract");
    assert!(!outside.exists());
    assert_eq!(fs::read(dir.path().join("vol/f")).expect("read"), b"new");
}

#[test]
fn round_trips_a_tree_through_pack_and_extract() {
    let src = tempfile::tempdir().expect("src");
    let s = src.path();
    fs::create_dir_all(s.join("d/e")).expect("dirs");
    fs::write(s.join("d/e/f.txt"), b"hello").expect("file");
    fs::write(s.join("top"), vec![7u8; 300_000]).expect("big file");
    fs::hard_link(s.join("top"), s.join("d/top-link")).expect("hard link");
    std::os::unix::fs::symlink("e/f.txt", s.join("d/sym")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", s.join("abs")).expect("abs symlink");
    let long = "n".repeat(150);
    fs::write(s.join(&long), b"long name").expect("long");
    fs::set_permissions(s.join("d/e/f.txt"), fs::Permissions::from_mode(0o751)).expect("chmod");
    for enc in [Encoding::Gzip, Encoding::Zstd, Encoding::Raw] {
        let source = open_source(s, ".").expect("source");
        let packed = pack_compressed(&source, Vec::new(), enc, IdMap::IDENTITY, s).expect("pack");
        let (dir, fd) = sandbox();
        extract_compressed(&fd, &packed[..], enc, IdMap::IDENTITY).expect("extract");
        let v = dir.path().join("vol");
        assert_eq!(fs::read(v.join("d/e/f.txt")).expect("f"), b"hello");
        assert_eq!(fs::read(v.join("top")).expect("top").len(), 300_000);
        assert_eq!(
            fs::metadata(v.join("top")).expect("top").ino(),
            fs::metadata(v.join("d/top-link")).expect("link").ino()
        );
        assert_eq!(
            fs::read_link(v.join("d/sym")).expect("sym"),
            Path::new("e/f.txt")
        );
        assert_eq!(
            fs::read_link(v.join("abs")).expect("abs"),
            Path::new("/etc/passwd")
        );
        assert_eq!(fs::read(v.join(&long)).expect("long"), b"long name");
        assert_eq!(
            fs::metadata(v.join("d/e/f.txt")).expect("f").mode() & 0o7777,
            0o751
        );
        assert_nothing_outside(dir.path());
    }
}

#[test]
fn names_directory_entries_dot_slash_and_a_file_by_its_base_name() {
    let src = tempfile::tempdir().expect("src");
    fs::create_dir(src.path().join("sub")).expect("sub");
    fs::write(src.path().join("sub/file"), b"x").expect("file");
    let names = |path: &str| -> Vec<String> {
        let source = open_source(src.path(), path).expect("source");
        let tar = pack(&source, Vec::new(), IdMap::IDENTITY, src.path()).expect("pack");
        let mut a = tar::Archive::new(&tar[..]);
        a.entries()
            .expect("entries")
            .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
            .collect()
    };
    assert_eq!(names("sub"), ["./", "./file"]);
    assert_eq!(names("sub/file"), ["file"]);
    assert!(matches!(
        open_source(src.path(), "missing"),
        Err(ArchiveError::NotFound)
    ));
}

#[test]
fn special_files_keep_their_exact_mode_whatever_the_umask() {
    // mknodat applies the umask (0022 from a shell or systemd): without the explicit
    // chmod after it, 0666 would land as 0644.
    let (dir, fd) = sandbox();
    let tar = tar_of(&[E::Fifo("p".into(), 0o666), E::Fifo("q".into(), 0o600)]);
    extract(&fd, &tar[..], IdMap::IDENTITY).expect("extract");
    let v = dir.path().join("vol");
    for (name, mode) in [("p", 0o666), ("q", 0o600)] {
        let m = fs::symlink_metadata(v.join(name)).expect(name);
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
        assert_eq!(m.mode() & 0o7777, mode, "mode of {name}");
    }
}

#[test]
fn maps_root_owner_on_the_way_in_and_back_on_the_way_out() {
    let (dir, fd) = sandbox();
    let ids = IdMap::root_as(65534, 65533);
    extract(&fd, &tar_of(&[E::File("f".into(), b"x".to_vec())])[..], ids).expect("extract");
    let v = dir.path().join("vol");
    let m = fs::metadata(v.join("f")).expect("f");
    assert_eq!((m.uid(), m.gid()), (65534, 65533));
    let source = open_source(&v, "f").expect("source");
    let tar = pack(&source, Vec::new(), ids, &v).expect("pack");
    let mut a = tar::Archive::new(&tar[..]);
    let e = a
        .entries()
        .expect("entries")
        .next()
        .expect("one")
        .expect("entry");
    assert_eq!(
        (
            e.header().uid().expect("uid"),
            e.header().gid().expect("gid")
        ),
        (0, 0)
    );
}

fn name_strategy() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("outside".to_string()),
    ];
    (any::<bool>(), prop::collection::vec(part, 1..5)).prop_map(|(abs, parts)| {
        let joined = parts.join("/");
        if abs {
            format!("/{joined}")
        } else {
            joined
        }
    })
}

fn entry_strategy() -> impl Strategy<Value = E> {
    prop_oneof![
        name_strategy().prop_map(|n| E::File(n, b"data".to_vec())),
        name_strategy().prop_map(E::Dir),
        (name_strategy(), name_strategy()).prop_map(|(n, t)| E::Symlink(n, t)),
        (name_strategy(), name_strategy()).prop_map(|(n, t)| E::HardLink(n, t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn nothing_lands_outside_the_volume_root(entries in prop::collection::vec(entry_strategy(), 1..12)) {
        let (dir, fd) = sandbox();
        // Success or refusal are both fine; escaping is not. A malformed tar would make
        // this test vacuous, so that is not fine.
        if let Err(e @ ArchiveError::Malformed(_)) = extract(&fd, &tar_of(&entries)[..], IdMap::IDENTITY) {
            panic!("the generated tar is malformed: {e}");
        }
        assert_nothing_outside(dir.path());
    }
}

#[test]
fn parses_raw_gzip_and_zstd_encodings_as_baggageclaim_names_them() {
    assert_eq!(Encoding::parse("raw"), Some(Encoding::Raw));
    assert_eq!(Encoding::parse("gzip"), Some(Encoding::Gzip));
    assert_eq!(Encoding::parse("x-gzip"), Some(Encoding::Gzip));
    assert_eq!(Encoding::parse("zstd"), Some(Encoding::Zstd));
    assert_eq!(Encoding::parse("br"), None);
    assert_eq!(Encoding::Raw.as_str(), "raw");
}
