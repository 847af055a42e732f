//! Directory trees on disk: their size with hard-linked files counted once, and copies made
//! of hard links (the git cache's work tree into a build dir).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bytes of a tree's files (symlinks count their own length), each inode once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub total: u64,
    /// The part that deleting the tree frees: files with no link outside it.
    pub exclusive: u64,
}

/// Walks `root` without following symlinks; unreadable parts count as empty.
pub fn usage(root: &Path) -> Usage {
    let (total, exclusive) = usages(&[root.to_path_buf()]);
    Usage {
        total,
        exclusive: exclusive[0],
    }
}

/// A file with several links, as the walk met it.
struct Linked {
    size: u64,
    seen: u64,
    links: u64,
    /// The one root it was met in; None once met in two.
    root: Option<usize>,
}

/// Several trees walked once: the bytes of all their files, each inode once, and for each
/// tree what deleting it alone frees (its files with no link outside it).
pub fn usages(roots: &[PathBuf]) -> (u64, Vec<u64>) {
    // Single-link files skip the map.
    let mut shared: HashMap<(u64, u64), Linked> = HashMap::new();
    let (mut total, mut exclusive) = (0, vec![0; roots.len()]);
    for (i, root) in roots.iter().enumerate() {
        let mut stack = vec![root.clone()];
        while let Some(p) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                let rd = std::fs::read_dir(&p).into_iter().flatten().flatten();
                stack.extend(rd.map(|e| e.path()));
            } else if md.nlink() <= 1 {
                total += md.len();
                exclusive[i] += md.len();
            } else {
                let f = shared.entry((md.dev(), md.ino())).or_insert(Linked {
                    size: md.len(),
                    seen: 0,
                    links: md.nlink(),
                    root: Some(i),
                });
                f.seen += 1;
                f.root = f.root.filter(|r| *r == i);
            }
        }
    }
    for f in shared.into_values() {
        total += f.size;
        if let Some(r) = f.root.filter(|_| f.seen >= f.links) {
            exclusive[r] += f.size;
        }
    }
    (total, exclusive)
}

/// Makes `to` (which must not exist) a copy of `from` whose files are hard links to the
/// originals (copies across file systems); `skip` gets each path relative to `from`.
/// Whoever changes `from` afterwards must replace files, never write them in place.
pub fn link_copy(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> std::io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (src, dst) = (from.join(&rel), to.join(&rel));
        let md = std::fs::symlink_metadata(&src)?;
        if md.is_dir() {
            std::fs::create_dir(&dst)?;
            std::fs::set_permissions(&dst, PermissionsExt::from_mode(md.mode() & 0o7777))?;
            for e in std::fs::read_dir(&src)? {
                let r = rel.join(e?.file_name());
                if !skip(&r) {
                    stack.push(r);
                }
            }
        } else if md.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_a_hard_linked_file_once_and_frees_it_only_with_its_last_link() {
        let d = crate::sys::fake::temp_dir("tree-usage");
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("shared"), [0u8; 1000]).unwrap();
        std::fs::write(a.join("own"), [0u8; 10]).unwrap();
        std::os::unix::fs::symlink("own", a.join("link")).unwrap();
        link_copy(&a, &b, &|r| r == Path::new("own")).unwrap();
        std::fs::write(b.join("new"), [0u8; 100]).unwrap();
        assert!(!b.join("own").exists());
        assert_eq!(
            std::fs::read_link(b.join("link")).unwrap(),
            Path::new("own")
        );
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&a.join("shared")), ino(&b.join("shared")));
        // 1000 shared + 10 + 3 (the symlink "own") in a, 100 + 3 in b.
        assert_eq!(usage(&d).total, 1000 + 10 + 3 + 100 + 3);
        assert_eq!(
            usage(&a),
            Usage {
                total: 1013,
                exclusive: 13
            }
        );
        // Walked together: the shared file counts once, and frees nothing alone.
        let (total, each) = usages(&[a.clone(), b.clone()]);
        assert_eq!((total, each), (1000 + 13 + 103, vec![13, 103]));
        std::fs::remove_dir_all(&b).unwrap();
        assert_eq!(usage(&a).exclusive, 1013);
        let _ = std::fs::remove_dir_all(&d);
    }
}
