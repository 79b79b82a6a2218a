//! The README's first command, `cargo run --example document_pipeline`,
//! run as the built example binary: it works wherever cargo puts its build
//! output (its database lives in the temporary directory, or at `--db`,
//! whose directory it creates), resumes on a second run, and reports a
//! failure as one sentence with its cause. `cargo test` builds the
//! examples before it runs this (not when it is picked alone with `--test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The example binary cargo built beside this test (`target/<profile>/examples/`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("document_pipeline{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run `cargo test -p treadle-examples`, which builds the examples",
        path.display()
    );
    path
}

fn run(tmp: &Path, args: &[&str]) -> Output {
    Command::new(example())
        .args(args)
        .current_dir(tmp)
        .env("TMPDIR", tmp)
        .output()
        .expect("the example runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn the_default_database_lives_in_the_temporary_directory_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp
        .path()
        .join("treadle-example")
        .join("document_pipeline.db");
    let first = stdout(&run(tmp.path(), &[]));
    assert!(
        first.contains(&format!("state: {}", db.display())),
        "{first}"
    );
    assert!(first.contains("submitted 5 new documents"), "{first}");
    assert!(db.exists());
    let second = stdout(&run(tmp.path(), &["--approve-all"]));
    assert!(second.contains("submitted 0 new documents"), "{second}");
    assert!(second.contains("5 of 5 documents exported"), "{second}");
}

#[test]
fn the_directory_of_a_given_database_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("nested").join("dir").join("docs.db");
    let out = stdout(&run(tmp.path(), &["--db", db.to_str().unwrap()]));
    assert!(out.contains("awaiting review: doc-2, doc-5"), "{out}");
    assert!(db.exists());
}

#[test]
fn a_failure_is_one_sentence_with_its_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let db = blocker.join("docs.db");
    let output = run(tmp.path(), &["--db", db.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("document_pipeline: cannot create the directory"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Os {") && !stderr.contains("kind:"),
        "{stderr}"
    );

    let foreign = tmp.path().join("notes.db");
    std::fs::write(&foreign, "hello\n".repeat(40)).unwrap();
    let output = run(tmp.path(), &["--db", foreign.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("is not a treadle database"), "{stderr}");
    assert!(!stderr.contains("NotATreadleDatabase"), "{stderr}");
}

#[test]
fn the_readme_walk_through_keeps_its_database_out_of_the_repository() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let mut paths = 0;
    for line in readme.lines().filter(|l| l.starts_with("$ cargo run")) {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "--db" {
                let path = words.next().expect("--db takes a path");
                assert!(Path::new(path).is_absolute(), "{line}");
                paths += 1;
            }
        }
    }
    assert!(paths > 0, "the walk-through names its database");
}
