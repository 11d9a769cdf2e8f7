//! Stream-in and stream-out throughput of a ~200 MB tree: the agent's tar code (the work
//! behind `PUT /volumes/{h}/stream-in` and `stream-out`, without the HTTP hop) against GNU
//! `tar -xzf` / `tar -czf` (and `tar --zstd`) on the same tree in the same run.
//!
//! Run: `cargo bench -p volume-agent --bench stream`. Prints MB/s of uncompressed tree
//! bytes and the ratio agent / tar (above 1 = the agent is faster).

use std::fs;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use volume_agent::contents::archive::{self, Encoding, ExtractOptions};
use volume_agent::contents::IdMap;

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 20;
const FILE_BYTES: usize = 100 * 1024;

/// Half pseudo-random, half repetitive text: gzip has real work and real gains.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    let half = buf.len() / 2;
    for b in &mut buf[..half] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let text = b"volume-agent keeps a CI worker's volumes in step with the central database. ";
    for (i, b) in buf[half..].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
}

fn make_tree(root: &Path) -> u64 {
    let mut buf = vec![0u8; FILE_BYTES];
    let mut total = 0u64;
    for d in 0..DIRS {
        let dir = root.join(format!("dir{d:03}"));
        fs::create_dir_all(&dir).expect("dir");
        for f in 0..FILES_PER_DIR {
            fill((d * FILES_PER_DIR + f) as u64 + 1, &mut buf);
            fs::write(dir.join(format!("file{f:03}.bin")), &buf).expect("file");
            total += FILE_BYTES as u64;
        }
    }
    total
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("run tar");
    assert!(status.success(), "{cmd:?} failed");
}

fn drop_dir(p: &Path) {
    let _ = fs::remove_dir_all(p);
}

fn report(what: &str, bytes: u64, ours: Duration, theirs: Duration, tool: &str) {
    let mbs = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "{what:<22} agent {:>8.1} MB/s ({:>6.2}s)   {tool:<14} {:>8.1} MB/s ({:>6.2}s)   ratio {:.2}",
        mbs(ours),
        ours.as_secs_f64(),
        mbs(theirs),
        theirs.as_secs_f64(),
        theirs.as_secs_f64() / ours.as_secs_f64(),
    );
}

fn main() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    let bytes = make_tree(&tree);
    println!(
        "tree: {} files, {:.0} MB, under a temp dir",
        DIRS * FILES_PER_DIR,
        bytes as f64 / 1e6
    );
    for (enc, ext, flag) in [
        (Encoding::Gzip, "tgz", "-z"),
        (Encoding::Zstd, "tzst", "--zstd"),
    ] {
        let ours_out = work.path().join(format!("agent.{ext}"));
        let tar_out = work.path().join(format!("tar.{ext}"));
        // Stream-out: pack and compress the tree into a file.
        let t_ours = time(|| {
            let source = archive::open_source(&tree, ".").expect("source");
            let out = BufWriter::new(fs::File::create(&ours_out).expect("out"));
            archive::pack_compressed(&source, out, enc, IdMap::IDENTITY, &tree).expect("pack");
        });
        let t_tar = time(|| {
            run(Command::new("tar")
                .arg(flag)
                .arg("-cf")
                .arg(&tar_out)
                .arg("-C")
                .arg(&tree)
                .arg("."))
        });
        report(
            &format!("stream-out {}", enc.as_str()),
            bytes,
            t_ours,
            t_tar,
            &format!("tar {flag} -c"),
        );
        // Stream-in: decompress and extract the same archive (tar's own) into a new dir.
        let ours_dest = work.path().join("in-agent");
        let tar_dest = work.path().join("in-tar");
        fs::create_dir(&ours_dest).expect("dest");
        fs::create_dir(&tar_dest).expect("dest");
        let t_ours = time(|| {
            let dest = volume_agent::fsx::Dir::open_root(&ours_dest).expect("dest");
            let input = BufReader::new(fs::File::open(&tar_out).expect("archive"));
            let opts = ExtractOptions::for_volume(true);
            archive::extract_compressed(&dest, &[], input, enc, &opts).expect("extract");
        });
        let t_tar = time(|| {
            run(Command::new("tar")
                .arg(flag)
                .arg("-xf")
                .arg(&tar_out)
                .arg("-C")
                .arg(&tar_dest))
        });
        report(
            &format!("stream-in {}", enc.as_str()),
            bytes,
            t_ours,
            t_tar,
            &format!("tar {flag} -x"),
        );
        let sample = "dir042/file007.bin";
        assert_eq!(
            fs::read(ours_dest.join(sample)).expect("ours"),
            fs::read(tree.join(sample)).expect("orig"),
            "the agent extracted different bytes"
        );
        drop_dir(&ours_dest);
        drop_dir(&tar_dest);
        let _ = fs::remove_file(&ours_out);
        let _ = fs::remove_file(&tar_out);
    }
}
