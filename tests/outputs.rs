//! Output files through the binary: written whole or not at all, never through a
//! symbolic link, and no temporary file left behind by a failure or an interruption.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{ferry, text};

/// Names under `dir` (recursively) that look like an atomic write's temporary file.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            found.push(name);
        } else if entry.file_type().unwrap().is_dir() {
            found.extend(leftovers(&entry.path()));
        }
    }
    found
}

const TUNE: [&str; 12] = [
    "tune",
    "--gpu",
    "cpu",
    "--device-mem",
    "64MiB",
    "--model",
    "test-tiny",
    "--prompt-len",
    "8",
    "--gen-len",
    "4",
    "--out",
];

#[test]
fn outputs_that_are_symbolic_links_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mine.yaml"), "kept").unwrap();
    std::os::unix::fs::symlink("mine.yaml", d.join("live.yaml")).unwrap();
    std::os::unix::fs::symlink("nowhere.yaml", d.join("dangling.yaml")).unwrap();
    for link in ["live.yaml", "dangling.yaml"] {
        let out = ferry(d, &[&TUNE[..], &[link, "--force"]].concat());
        assert_eq!(out.status.code(), Some(2), "{link}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("symbolic link"), "{}", text(&out.stderr));
    }
    // The same for synth's folder.
    std::fs::create_dir(d.join("real")).unwrap();
    std::os::unix::fs::symlink("real", d.join("model")).unwrap();
    let out = ferry(d, &["synth", "--model", "test-tiny", "--out", "model"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("symbolic link"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(d.join("mine.yaml")).unwrap(), "kept");
    assert!(!d.join("nowhere.yaml").exists(), "written through a dangling link");
    assert_eq!(std::fs::read_dir(d.join("real")).unwrap().count(), 0, "written through a linked folder");
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
}

#[test]
fn a_failed_write_leaves_nothing_and_a_good_one_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("file"), "").unwrap();
    // The parent of the output is a file: an error naming it, and nothing written.
    let out = ferry(d, &[&TUNE[..], &["file/plan.yaml"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("file/plan.yaml"), "{}", text(&out.stderr));
    let out = ferry(d, &["synth", "--model", "test-tiny", "--out", "file/model"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // Complete writes: the plan, plots, a synthetic model; each file whole, no temporary.
    let out = ferry(d, &[&TUNE[..], &["plan.yaml", "--batch", "2", "--plots", "plots"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ferry(d, &["synth", "--model", "test-tiny", "--out", "tiny"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ferry(d, &["simulate", "--plan", "plan.yaml", "--trace", "trace.json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for file in ["plan.yaml", "plots/throughput-vs-batch.png", "plots/throughput-vs-batch.svg", "trace.json"] {
        assert!(d.join(file).metadata().unwrap().len() > 0, "{file} is empty");
    }
    let names: Vec<_> = std::fs::read_dir(d.join("tiny")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Existing files still need --force.
    let out = ferry(d, &["simulate", "--plan", "plan.yaml", "--trace", "trace.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--force"), "{}", text(&out.stderr));
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
}
/// Sends `signal` to a synth of a model big enough to take seconds once its weights
/// file is being written; the process must exit 128 + signal and leave nothing.
fn interrupt_synth(signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["synth", "--model", "test-small", "--dtype", "f32", "--out", "model"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut started = false;
    for _ in 0..500 {
        if out.exists() && !leftovers(&out).is_empty() {
            started = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(started, "the synth never started writing");
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + signal), "{status:?} (did the synth finish before the signal?)");
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    assert!(!out.join("model.safetensors").exists(), "a partial weights file");
    assert!(!out.join("config.json").exists(), "a config.json without its weights");
}

#[test]
fn sigterm_removes_the_temporary_files_of_writes_in_progress() {
    interrupt_synth(libc::SIGTERM);
}

#[test]
fn sigint_removes_the_temporary_files_of_writes_in_progress() {
    interrupt_synth(libc::SIGINT);
}

#[test]
fn a_write_that_fails_midway_leaves_neither_a_temporary_nor_a_partial_file() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.args(["synth", "--model", "test-tiny", "--dtype", "f32", "--out", "tiny"]).current_dir(dir.path());
    // Files may grow to 1 MiB only, and writing past that fails with EFBIG instead of
    // killing the process (SIGXFSZ ignored; an ignored signal stays so across exec):
    // the 3.3 MiB weights file fails after its first megabyte is written.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("model.safetensors"), "{}", text(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(dir.path().join("tiny")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a failed synth left {left:?}");
}
