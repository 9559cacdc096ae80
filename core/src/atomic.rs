//! Output files written atomically: under a temporary name beside the target (same
//! folder, so the final rename never crosses a file system), renamed into place only
//! once complete. A failed or interrupted write leaves the target as it was and no
//! temporary file behind: the temporary is removed on drop, and every live one is
//! listed in a registry that the command-line front end empties when SIGINT or SIGTERM
//! arrive (`remove_live_temps`).

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{CoreError, Result};

/// The temporary files of writes in progress. Creating, renaming and removing one
/// happen under this lock, so a signal handler that empties it never races a rename.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Set once the registry was emptied for an exit: no new temporary file may appear.
static CLOSED: AtomicBool = AtomicBool::new(false);

fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    // A thread that panicked while holding the lock left a consistent list (every
    // change is one push or one removal), so the poison carries nothing to fear.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes the temporary file of every write in progress and refuses new ones; for the
/// handler of an interrupting signal, just before the process exits.
pub fn remove_live_temps() {
    let mut live = live();
    CLOSED.store(true, Ordering::SeqCst);
    for path in live.drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// Refuses an output path that is a symbolic link, dangling or not: writing through
/// one would land somewhere the user did not name.
pub fn refuse_symlink(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => Err(CoreError::invalid(format!(
            "{} is a symbolic link; refusing to write through it (name the real path, or remove the link)",
            target.display()
        ))),
        _ => Ok(()),
    }
}

/// Checks that `target` may be written: not a symbolic link (`refuse_symlink`), not a
/// folder, and absent unless `overwrite`.
pub fn check_output_path(target: &Path, overwrite: bool) -> Result<()> {
    refuse_symlink(target)?;
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => Err(CoreError::invalid(format!("{} is a folder, not a file", target.display()))),
        Ok(_) if !overwrite => {
            Err(CoreError::invalid(format!("{} already exists; pass --force to overwrite it", target.display())))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CoreError::io(target, e)),
    }
}

/// A file being written under a temporary name beside `target`; `commit` renames it
/// into place, dropping it uncommitted removes it. Implements `Write` (unbuffered: wrap
/// it in a `BufWriter` for small writes).
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    overwrite: bool,
}

impl AtomicFile {
    /// Checks `target` (`check_output_path`), creates its parent folders and a fresh
    /// temporary file beside it with `create_new`.
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicFile> {
        check_output_path(target, overwrite)?;
        let name =
            target.file_name().ok_or_else(|| CoreError::invalid(format!("{}: not a file name", target.display())))?;
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
        let name = Path::new(name);
        // The extension stays last: writers that pick a format by it (plotters' PNG
        // encoder) must see the target's.
        let stem = name.file_stem().unwrap_or(name.as_os_str()).to_string_lossy();
        let ext = name.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        for _ in 0..16 {
            let temp = parent.join(format!(".{stem}.tmp-{}-{:016x}{ext}", std::process::id(), random()));
            let mut live = live();
            if CLOSED.load(Ordering::SeqCst) {
                return Err(CoreError::invalid("interrupted: no new files are written"));
            }
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(file) => {
                    live.push(temp.clone());
                    return Ok(AtomicFile { target: target.to_path_buf(), temp, file: Some(file), overwrite });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CoreError::io(&temp, e)),
            }
        }
        Err(CoreError::invalid(format!("{}: no free temporary name beside it", target.display())))
    }

    /// The temporary file's path, for writers that open files by name themselves.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Flushes the data to the disk and renames the temporary file into place. The
    /// target is checked again first: it may have appeared since `create`.
    pub fn commit(mut self) -> Result<()> {
        // `file` is only taken here (commit consumes the writer) and in `Drop`.
        let Some(file) = self.file.take() else {
            return Err(CoreError::invalid(format!("{}: already committed", self.target.display())));
        };
        file.sync_all().map_err(|e| CoreError::io(&self.temp, e))?;
        drop(file);
        check_output_path(&self.target, self.overwrite)?;
        let mut live = live();
        if CLOSED.load(Ordering::SeqCst) {
            return Err(CoreError::invalid("interrupted: the file was not written"));
        }
        std::fs::rename(&self.temp, &self.target).map_err(|e| CoreError::io(&self.target, e))?;
        live.retain(|p| p != &self.temp);
        drop(live);
        // The rename itself reaches the disk once the folder is synced; a failure
        // here loses nothing already renamed, so it is not an error.
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        self.file.as_mut().ok_or_else(|| std::io::Error::other("the file was committed"))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file()?.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        self.file = None;
        // A committed file left the registry when it was renamed; anything still
        // listed is a write that did not complete.
        let mut live = live();
        if let Some(index) = live.iter().position(|p| p == &self.temp) {
            live.swap_remove(index);
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A scratch file's path, removed when this is dropped or, like the temporary files of
/// writes in progress, when the process is interrupted (`remove_live_temps`).
pub struct ScratchPath(PathBuf);

impl ScratchPath {
    pub fn register(path: PathBuf) -> ScratchPath {
        live().push(path.clone());
        ScratchPath(path)
    }
}

impl Drop for ScratchPath {
    fn drop(&mut self) {
        let mut live = live();
        live.retain(|p| p != &self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `bytes` to `target` atomically (`AtomicFile`), refusing an existing file
/// unless `overwrite` and a symbolic link always.
pub fn write_atomic(target: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let mut file = AtomicFile::create(target, overwrite)?;
    file.write_all(bytes).map_err(|e| CoreError::io(target, e))?;
    file.commit()
}

/// 64 random bits from the standard library's per-process random hasher keys.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_committed_write_replaces_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.yaml");
        write_atomic(&path, b"one", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let err = write_atomic(&path, b"two", false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        write_atomic(&path, b"two", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn an_uncommitted_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        let mut file = AtomicFile::create(&path, false).unwrap();
        file.write_all(b"partial").unwrap();
        let temp = file.temp_path().to_path_buf();
        assert!(temp.exists() && temp.to_string_lossy().ends_with(".json"), "{}", temp.display());
        drop(file);
        assert!(!path.exists() && !temp.exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn symbolic_links_are_refused_dangling_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.yaml");
        std::fs::write(&real, "kept").unwrap();
        for (link, to) in [("live.yaml", real.clone()), ("dangling.yaml", dir.path().join("nowhere"))] {
            let link = dir.path().join(link);
            std::os::unix::fs::symlink(&to, &link).unwrap();
            let err = write_atomic(&link, b"x", true).unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{err}");
            assert!(err.is_usage_error());
        }
        assert_eq!(std::fs::read(&real).unwrap(), b"kept");
        assert!(!dir.path().join("nowhere").exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_parent_that_is_a_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let err = write_atomic(&dir.path().join("file/out.yaml"), b"x", false).unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
        assert!(leftovers(dir.path()).is_empty());
    }
}
