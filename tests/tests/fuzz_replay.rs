//! Replays the committed fuzz corpora (fuzz/corpus/<target>, grown and minimized by
//! tools/fuzz.sh) through the same target bodies the fuzzer runs, on stable Rust: a loader that
//! panics on any input the fuzzer once found interesting fails the ordinary test suite.

use kiln_tests::fuzz::TARGETS;
use std::path::PathBuf;

#[test]
fn fuzz_corpora_replay_without_panics() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, body) in TARGETS {
        let dir = root.join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 3,
            "{name}: only {} corpus inputs",
            files.len()
        );
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{name}: {} panicked", f.display());
        }
        eprintln!("{name}: {} inputs replayed", files.len());
    }
}
