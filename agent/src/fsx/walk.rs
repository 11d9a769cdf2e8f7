//! An iterative, depth-first walk of a tree of open directories.

use std::io;

use super::{Dir, Entry, FsxError, Kind, Name, Op, TooDeep};

/// The deepest a walk goes: each level holds one open directory (a copy two), so this
/// bounds the descriptors a walk holds as well as its memory.
pub const MAX_DEPTH: usize = 256;

/// Whether a walk goes into an entry.
pub enum Descend {
    /// Not into this entry.
    No,
    /// Into this directory entry (the walk opens it).
    Yes,
    /// Into this directory, already opened by the visitor (a followed symlink).
    Into(Dir),
}

/// What a [`walk`] does at each entry.
pub trait Visitor {
    type Error: From<FsxError>;

    /// Called for each entry of `dir` (its `kind` stat'ed when the listing did not say).
    /// Says whether to descend into it ([`Descend::Yes`] only counts for a directory).
    fn entry(&mut self, dir: &Dir, name: Name<'_>, kind: Kind) -> Result<Descend, Self::Error>;

    /// `child`, a directory `entry` asked to descend into, is open; its entries come next.
    fn enter(&mut self, _parent: &Dir, _child: &Dir) -> Result<(), Self::Error> {
        Ok(())
    }

    /// `child`, a directory `entry` asked to descend into, is open, `depth` levels below the
    /// tree's root (its parent's depth, as [`walk_from`] counts). Returns it to be walked
    /// next; a visitor that has it walked elsewhere (on another thread, with [`walk_from`]
    /// from `depth`) keeps it and returns `None`. The default walks it here.
    fn hand_off(
        &mut self,
        _parent: &Dir,
        child: Dir,
        _depth: usize,
    ) -> Result<Option<Dir>, Self::Error> {
        Ok(Some(child))
    }

    /// The directory `name` could not be opened because it is gone
    /// ([`FsxError::is_not_found`]), no longer a directory ([`FsxError::is_wrong_kind`]):
    /// something changed the tree while it was walked), or another file system is mounted
    /// on it ([`FsxError::is_mount_point`]; never entered). The default fails the walk.
    fn changed(&mut self, _dir: &Dir, _name: Name<'_>, err: FsxError) -> Result<(), Self::Error> {
        Err(err.into())
    }

    /// Every entry of `dir` was visited (called for the root last).
    fn leave(&mut self, _dir: &Dir) -> Result<(), Self::Error> {
        Ok(())
    }
}

struct Frame {
    /// `None` for the root, which the caller owns.
    dir: Option<Dir>,
    entries: Vec<Entry>,
    next: usize,
}

/// Walks the tree under `root` depth first with an explicit stack (no recursion): every
/// directory opened relative to its parent's handle, never through a symlink, never onto
/// another mount, at most [`MAX_DEPTH`] deep.
pub fn walk<V: Visitor>(root: &Dir, v: &mut V) -> Result<(), V::Error> {
    walk_from(root, 0, v)
}

/// [`walk`] of a subtree whose root's parent is `base` levels below the tree's own root
/// (a directory [`Visitor::hand_off`] kept, with the depth it was given), so [`MAX_DEPTH`]
/// still bounds the whole tree.
pub fn walk_from<V: Visitor>(root: &Dir, base: usize, v: &mut V) -> Result<(), V::Error> {
    let mut stack = vec![Frame {
        dir: None,
        entries: root.entries()?,
        next: 0,
    }];
    while let Some(top) = stack.last_mut() {
        if top.next >= top.entries.len() {
            if let Some(frame) = stack.pop() {
                v.leave(frame.dir.as_ref().unwrap_or(root))?;
            }
            continue;
        }
        let i = top.next;
        top.next += 1;
        let depth = base + stack.len();
        let Some(top) = stack.last() else { break };
        let dir = top.dir.as_ref().unwrap_or(root);
        let entry = &top.entries[i];
        let name = entry.name.as_name();
        let kind = match entry.kind {
            Kind::Unknown => match dir.stat(name) {
                Ok(m) => m.kind,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            },
            k => k,
        };
        let opened = match v.entry(dir, name, kind)? {
            Descend::No => continue,
            Descend::Yes if kind != Kind::Dir => continue,
            Descend::Yes => None,
            Descend::Into(d) => Some(d),
        };
        if depth >= MAX_DEPTH {
            return Err(
                FsxError::new(Op::Walk, dir.rel_of(name), io::Error::other(TooDeep)).into(),
            );
        }
        let child = match opened {
            Some(c) => c,
            None => match dir.open_dir(name) {
                Ok(c) => c,
                Err(e) if e.is_not_found() || e.is_wrong_kind() || e.is_mount_point() => {
                    v.changed(dir, name, e)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let Some(child) = v.hand_off(dir, child, depth)? else {
            continue;
        };
        v.enter(dir, &child)?;
        let entries = child.entries()?;
        stack.push(Frame {
            dir: Some(child),
            entries,
            next: 0,
        });
    }
    Ok(())
}
