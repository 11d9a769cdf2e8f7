use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::contents::IdMap;

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

/// Options of a privileged volume without limits, owners mapped with `ids`.
fn opts(ids: IdMap) -> ExtractOptions {
    ExtractOptions {
        ids,
        devices: true,
        max_bytes: None,
        max_entries: None,
    }
}

/// Extracts into the root `fd` itself.
fn ex(fd: &Dir, input: impl Read, ids: IdMap) -> Result<Extracted, ArchiveError> {
    extract(fd, &[], input, &opts(ids))
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
fn sandbox() -> (tempfile::TempDir, Dir) {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("vol")).expect("vol");
    fs::create_dir(dir.path().join("outside")).expect("outside");
    let fd = Dir::open_root(&dir.path().join("vol")).expect("open vol");
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
    let err = ex(&fd, &tar_of(entries)[..], IdMap::IDENTITY).expect_err("must refuse");
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
    let e = ex(&fd, &tar_of(&entries)[..], IdMap::IDENTITY).expect_err("refused");
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
    ex(
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
        extract_compressed(&fd, &[], &packed[..], enc, &opts(IdMap::IDENTITY)).expect("extract");
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
    ex(&fd, &tar[..], IdMap::IDENTITY).expect("extract");
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
    ex(&fd, &tar_of(&[E::File("f".into(), b"x".to_vec())])[..], ids).expect("extract");
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
        if let Err(e @ ArchiveError::Malformed(_)) = ex(&fd, &tar_of(&entries)[..], IdMap::IDENTITY) {
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

/// Every name in `dir`, recursively, relative to it (sorted).
fn tree_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("list") {
            let e = e.expect("entry");
            let p = e.path();
            out.push(
                p.strip_prefix(dir)
                    .expect("under")
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().expect("type").is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn chain_dirs() -> Vec<E> {
    let mut entries = Vec::new();
    let mut path = String::new();
    for i in 1..=8 {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&format!("d{i}"));
        entries.push(E::Dir(path.clone()));
    }
    entries
}

const CHAIN: &str = "d1/d2/d3/d4/d5/d6/d7/d8";
const CHAIN_BACK: &str = "../../../../../../../..";

#[test]
fn refuses_chained_relative_symlinks_that_resolve_outside_through_the_real_tree() {
    // The issue's finding: each link alone climbs no higher than the root, lexically.
    let mut entries = chain_dirs();
    entries.push(E::Symlink(format!("{CHAIN}/back"), CHAIN_BACK.into()));
    entries.push(E::Symlink(
        "esc".into(),
        format!("{CHAIN}/back/../../../../../../../.."),
    ));
    let (dir, fd) = sandbox();
    let e = ex(&fd, &tar_of(&entries)[..], IdMap::IDENTITY).expect_err("must refuse");
    assert!(
        matches!(&e, ArchiveError::Unsafe { name, .. } if name == "esc"),
        "{e}"
    );
    assert_nothing_outside(dir.path());
    assert!(
        tree_names(&dir.path().join("vol")).is_empty(),
        "a refused stream leaves nothing behind"
    );
}

#[test]
fn refuses_a_symlink_chained_through_links_already_in_the_volume() {
    let (dir, fd) = sandbox();
    let v = dir.path().join("vol");
    fs::create_dir_all(v.join(CHAIN)).expect("chain");
    std::os::unix::fs::symlink(CHAIN_BACK, v.join(CHAIN).join("back")).expect("back");
    let tar = tar_of(&[E::Symlink("esc".into(), format!("{CHAIN}/back/../../.."))]);
    let e = ex(&fd, &tar[..], IdMap::IDENTITY).expect_err("must refuse");
    assert!(e.to_string().contains("\"esc\""), "{e}");
    assert!(fs::symlink_metadata(v.join("esc")).is_err());
    // Through the same link, staying inside, is fine.
    let ok = tar_of(&[E::Symlink("fine".into(), format!("{CHAIN}/back/d1"))]);
    ex(&fd, &ok[..], IdMap::IDENTITY).expect("a link through a link that stays inside");
}

#[test]
fn refuses_climbing_out_of_a_link_a_later_entry_could_retarget() {
    // x -> d, l -> x/.. (the root, today), then x -> . would make l climb above the root.
    let e = refused(&[
        E::Dir("d".into()),
        E::Symlink("x".into(), "d".into()),
        E::Symlink("l".into(), "x/..".into()),
    ]);
    assert!(e.to_string().contains("\"l\""), "{e}");
    // `..` out of a name that does not exist yet is refused for the same reason.
    let e = refused(&[E::Symlink("m".into(), "later/../..".into())]);
    assert!(e.to_string().contains("\"m\""), "{e}");
}

#[test]
fn keeps_relative_symlinks_that_stay_inside_and_absolute_ones_as_they_are() {
    let (dir, fd) = sandbox();
    let mut entries = chain_dirs();
    entries.push(E::Symlink(format!("{CHAIN}/back"), CHAIN_BACK.into()));
    entries.push(E::Symlink("d1/up".into(), "../d1/d2".into()));
    entries.push(E::Symlink("abs".into(), "/etc/shadow".into()));
    entries.push(E::Symlink("dangling".into(), "not/yet/here".into()));
    ex(&fd, &tar_of(&entries)[..], IdMap::IDENTITY).expect("extract");
    let v = dir.path().join("vol");
    assert_eq!(
        fs::read_link(v.join("abs")).expect("abs"),
        Path::new("/etc/shadow")
    );
    assert_eq!(
        fs::read_link(v.join("d1/up")).expect("up"),
        Path::new("../d1/d2")
    );
    assert_nothing_outside(dir.path());
}

/// A device node entry (`kind` Block or Char) named `name`.
fn device_tar(name: &str, kind: EntryType, major: u32, minor: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o666);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(major).expect("major");
    h.set_device_minor(minor).expect("minor");
    append(&mut b, &mut h, name.as_bytes(), None, io::empty()).expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn refuses_device_nodes_in_an_unprivileged_volume_naming_the_entry() {
    for (name, kind, major, minor) in [
        ("disk", EntryType::Block, 254, 0),
        ("mem", EntryType::Char, 1, 1),
    ] {
        let (dir, fd) = sandbox();
        let unprivileged = ExtractOptions::for_volume(false);
        let e = extract(
            &fd,
            &[],
            &device_tar(name, kind, major, minor)[..],
            &unprivileged,
        )
        .expect_err("refused");
        assert!(
            matches!(&e, ArchiveError::Device { name: n } if n == name),
            "{e}"
        );
        assert!(tree_names(&dir.path().join("vol")).is_empty());
    }
}

#[test]
fn makes_device_nodes_in_a_privileged_volume() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: making device nodes needs root");
        return;
    }
    let (dir, fd) = sandbox();
    ex(
        &fd,
        &device_tar("null", EntryType::Char, 1, 3)[..],
        IdMap::IDENTITY,
    )
    .expect("extract");
    let m = fs::symlink_metadata(dir.path().join("vol/null")).expect("node");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &m.file_type()
    ));
    assert_eq!(m.mode() & 0o7777, 0o666);
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}", width = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

/// A GNU sparse entry `name` of apparent size `size` holding 4 KiB of `x` at its end.
fn sparse_tar(name: &str, size: u64) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(4096);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_path(name).expect("name");
    {
        let g = h.as_gnu_mut().expect("gnu");
        octal(&mut g.sparse[0].offset, size - 4096);
        octal(&mut g.sparse[0].numbytes, 4096);
        octal(&mut g.realsize, size);
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[b'x'; 4096]);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn sparse_entries_keep_their_holes() {
    let size = 256 << 20;
    let tar = sparse_tar("sparse", size);
    assert!(tar.len() < 10 * 1024, "the tar itself is small");
    let (dir, fd) = sandbox();
    ex(&fd, &tar[..], IdMap::IDENTITY).expect("extract");
    let m = fs::metadata(dir.path().join("vol/sparse")).expect("file");
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated for a file of 4 KiB of data",
        m.blocks() * 512
    );
    let data = fs::read(dir.path().join("vol/sparse")).expect("read");
    assert!(data[..(size as usize - 4096)].iter().all(|b| *b == 0));
    assert!(data[size as usize - 4096..].iter().all(|b| *b == b'x'));
}

fn limited(max_bytes: Option<u64>, max_entries: Option<u64>) -> ExtractOptions {
    ExtractOptions {
        max_bytes,
        max_entries,
        ..opts(IdMap::IDENTITY)
    }
}

#[test]
fn a_gzip_bomb_over_the_byte_limit_is_refused_and_leaves_nothing() {
    let zeros = vec![0u8; 64 << 20];
    let tar = tar_of(&[
        E::Dir("a".into()),
        E::File("a/small".into(), b"x".to_vec()),
        E::File("a/bomb".into(), zeros),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    assert!(gz.len() < 200 * 1024, "{} bytes", gz.len());
    let (dir, fd) = sandbox();
    fs::write(dir.path().join("vol/keep"), b"was here").expect("keep");
    let e = extract_compressed(
        &fd,
        &[],
        &gz[..],
        Encoding::Gzip,
        &limited(Some(1 << 20), None),
    )
    .expect_err("over the limit");
    assert!(matches!(e, ArchiveError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("api.stream_in_max_bytes"), "{e}");
    assert_eq!(tree_names(&dir.path().join("vol")), ["keep"]);
}

#[test]
fn a_tar_over_the_entry_limit_is_refused_and_leaves_nothing() {
    let entries: Vec<E> = (0..2000)
        .map(|i| E::File(format!("d{}/f{i}", i % 7), Vec::new()))
        .collect();
    let (dir, fd) = sandbox();
    let e = extract(
        &fd,
        &[b"sub"],
        &tar_of(&entries)[..],
        &limited(None, Some(500)),
    )
    .expect_err("over the limit");
    assert!(e.to_string().contains("api.stream_in_max_entries"), "{e}");
    assert!(tree_names(&dir.path().join("vol")).is_empty());
}

#[test]
fn caller_mistakes_are_invalid_entries_naming_the_entry() {
    let long = "n".repeat(300);
    let cases: Vec<(Vec<E>, &str)> = vec![
        (vec![E::HardLink("h".into(), "missing".into())], "h"),
        (
            vec![E::Dir("d".into()), E::HardLink("h".into(), "d".into())],
            "h",
        ),
        (
            vec![
                E::Dir("d".into()),
                E::File("d/f".into(), b"x".to_vec()),
                E::File("d".into(), b"over a directory".to_vec()),
            ],
            "d",
        ),
        (vec![E::File(format!("a/{long}"), b"x".to_vec())], "a/"),
        (vec![E::Symlink("s".into(), String::new())], "s"),
    ];
    for (entries, name) in cases {
        let e = refused(&entries);
        assert!(
            matches!(
                e,
                ArchiveError::Invalid { .. } | ArchiveError::Unsafe { .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("\"{name}")), "{name}: {e}");
    }
}

#[test]
fn a_file_replaces_an_empty_directory() {
    let (dir, fd) = sandbox();
    fs::create_dir(dir.path().join("vol/d")).expect("d");
    ex(
        &fd,
        &tar_of(&[E::File("d".into(), b"x".to_vec())])[..],
        IdMap::IDENTITY,
    )
    .expect("extract");
    assert_eq!(fs::read(dir.path().join("vol/d")).expect("file"), b"x");
}

/// A count from the environment variable `name`, else `default`.
fn env_count(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn arbitrary_tar_bytes_never_panic_and_never_write_outside() {
    use proptest::test_runner::{Config, TestRunner};
    let cases = env_count("STREAM_FUZZ_CASES", 2000);
    // A valid tar to mutate, so the fuzzing reaches past the first header.
    let mut seed = chain_dirs();
    seed.push(E::Symlink(format!("{CHAIN}/back"), CHAIN_BACK.into()));
    seed.push(E::Symlink("esc".into(), format!("{CHAIN}/back/..")));
    seed.push(E::File("d1/f".into(), vec![1u8; 2000]));
    seed.push(E::HardLink("h".into(), "d1/f".into()));
    seed.push(E::Fifo("p".into(), 0o644));
    let seed = tar_of(&seed);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let input = (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..24),
        prop::collection::vec(any::<u8>(), 0..2048),
        0u8..4,
    );
    let ran = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&input, |(flips, noise, how)| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut bytes = if how == 3 {
                noise.clone()
            } else {
                seed.clone()
            };
            if how != 3 {
                for (at, b) in &flips {
                    let i = at.index(bytes.len());
                    bytes[i] = *b;
                }
            }
            let (enc, body) = match how {
                0 => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&bytes).expect("gzip");
                    (Encoding::Gzip, gz.finish().expect("gzip"))
                }
                1 => (
                    Encoding::Zstd,
                    zstd::encode_all(&bytes[..], 1).expect("zstd"),
                ),
                _ => (Encoding::Raw, bytes),
            };
            let (dir, fd) = sandbox();
            let unprivileged = ExtractOptions {
                max_bytes: Some(64 << 20),
                ..ExtractOptions::for_volume(false)
            };
            let _ = extract_compressed(&fd, &[], &body[..], enc, &unprivileged);
            // Arbitrary bytes claiming to be compressed, too.
            let claimed = if how % 2 == 0 {
                Encoding::Zstd
            } else {
                Encoding::Gzip
            };
            let _ = extract_compressed(&fd, &[], &noise[..], claimed, &unprivileged);
            assert_nothing_outside(dir.path());
            Ok(())
        })
        .expect("no case fails");
    println!(
        "extraction fuzz: {} cases of arbitrary tar bytes (set STREAM_FUZZ_CASES for more)",
        ran.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Swaps `a` and `b` in `dir` with `renameat2(RENAME_EXCHANGE)` until `stop`.
fn swapper(
    dir: PathBuf,
    a: &'static str,
    b: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let d = Dir::open_root(&dir).expect("dir");
        let mut swaps = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = rustix::fs::renameat_with(&d, a, &d, b, rustix::fs::RenameFlags::EXCHANGE);
            if r.is_ok() {
                swaps += 1;
            }
        }
        swaps
    })
}

/// A decoy host tree beside the volume, with a marker in its file.
fn decoy(dir: &Path) -> PathBuf {
    let d = dir.join("outside/decoy");
    fs::create_dir_all(&d).expect("decoy");
    fs::write(d.join("secret"), b"DECOY-SECRET-MARKER").expect("secret");
    d
}

use std::sync::Arc;

#[test]
fn stream_in_racing_a_symlink_swapper_never_writes_outside() {
    let (dir, fd) = sandbox();
    let v = dir.path().join("vol");
    let d = decoy(dir.path());
    fs::create_dir(v.join("work")).expect("work");
    std::os::unix::fs::symlink(&d, v.join("swap")).expect("swap link");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = swapper(v.clone(), "work", "swap", stop.clone());
    let tar = tar_of(&[
        E::Dir("work/sub".into()),
        E::File("work/sub/f".into(), b"payload".to_vec()),
        E::File("work/g".into(), b"payload".to_vec()),
        E::Symlink("work/l".into(), "sub/f".into()),
    ]);
    let n = env_count("SWAPPER_ATTEMPTS", 200);
    for _ in 0..n {
        let _ = ex(&fd, &tar[..], IdMap::IDENTITY);
        assert_eq!(
            tree_names(&d),
            ["secret"],
            "the stream wrote into the decoy tree"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = t.join().expect("swapper");
    println!("stream-in swapper race: {n} attempts, {swaps} swaps");
}

#[test]
fn stream_out_racing_a_symlink_swapper_never_reads_outside() {
    let (dir, _fd) = sandbox();
    let v = dir.path().join("vol");
    let d = decoy(dir.path());
    fs::create_dir(v.join("work")).expect("work");
    fs::write(v.join("work/own"), b"volume data").expect("own");
    std::os::unix::fs::symlink(&d, v.join("swap")).expect("swap link");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = swapper(v.clone(), "work", "swap", stop.clone());
    let n = env_count("SWAPPER_ATTEMPTS", 200);
    for i in 0..n {
        let path = if i % 2 == 0 { "." } else { "work" };
        let Ok(source) = open_source(&v, path) else {
            continue;
        };
        let Ok(tar) = pack(&source, Vec::new(), IdMap::IDENTITY, &v) else {
            continue;
        };
        assert!(
            !tar.windows(19).any(|w| w == b"DECOY-SECRET-MARKER"),
            "stream-out read the decoy tree"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = t.join().expect("swapper");
    println!("stream-out swapper race: {n} attempts, {swaps} swaps");
}

#[test]
fn two_streams_writing_the_same_files_at_once_both_succeed() {
    let (dir, fd) = sandbox();
    let tar = tar_of(&[
        E::File("f".into(), b"payload".to_vec()),
        E::Dir("d".into()),
        E::File("d/g".into(), b"payload".to_vec()),
    ]);
    let n = env_count("SWAPPER_ATTEMPTS", 200);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..n {
                        ex(&fd, &tar[..], IdMap::IDENTITY)?;
                    }
                    Ok::<(), ArchiveError>(())
                })
            })
            .collect();
        for r in runs {
            r.join()
                .expect("thread")
                .expect("a stream failed on the other's entries");
        }
    });
    assert_eq!(fs::read(dir.path().join("vol/f")).expect("f"), b"payload");
    assert_nothing_outside(dir.path());
}
