//! Helpers for Troupe's multi-process tests: locate the `troupe` binary, run it, and
//! generate small data sets. The binary comes from `TROUPE_BIN` when set (e.g. a release
//! build), else from the workspace target directory next to this test executable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the `troupe` binary under test.
pub fn troupe_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TROUPE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/troupe
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = profile_dir.join(format!("troupe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p troupe-node) or set TROUPE_BIN",
        bin.display()
    );
    bin
}

/// Runs `troupe` with `args` and returns its output.
pub fn troupe(args: &[&str]) -> Output {
    Command::new(troupe_bin())
        .args(args)
        .env("TROUPE_LOG", "warn")
        .output()
        .expect("running troupe")
}

/// Root of the shared data sets (`../shared/data` from the workspace), if present.
/// When `TROUPE_REQUIRE_SHARED=1` is set, a missing folder is a failure, not a skip.
pub fn shared_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if root.is_dir() {
        return Some(root);
    }
    if std::env::var("TROUPE_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and TROUPE_REQUIRE_SHARED=1", root.display());
    }
    eprintln!(
        "skipping: {} not found (set TROUPE_REQUIRE_SHARED=1 to make this fail)",
        root.display()
    );
    None
}

/// Parses the single JSON object `troupe eval --json` prints on stdout.
pub fn parse_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "troupe failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout must be one line: {stdout}"
    );
    serde_json::from_str(stdout.trim_end()).expect("stdout is JSON")
}
