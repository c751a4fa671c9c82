//! Replays what fuzzing found: every committed crasher (`fuzz/regressions/<case>/*`) through
//! the same case function the fuzz target runs (fuzz/cases.rs), on stable Rust. A crash
//! here is a panic or an abort of this test binary, either of which fails the test.

#[path = "../fuzz/cases.rs"]
mod cases;

#[test]
fn committed_crashers_run_without_crashing() {
    let dir = cases::root().join("fuzz/regressions");
    let mut replayed = 0;
    for (name, case) in cases::CASES {
        let Ok(entries) = std::fs::read_dir(dir.join(name)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            eprintln!("{name}: {}", path.display());
            case(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no crashers under {}", dir.display());
}

#[test]
fn every_regression_folder_names_a_case() {
    let dir = cases::root().join("fuzz/regressions");
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            cases::CASES.iter().any(|(n, _)| *n == name),
            "fuzz/regressions/{name} is not a case in fuzz/cases.rs"
        );
    }
}

/// The mutation run, as a new user would try it: random bytes overwritten in the
/// first 64 KiB of the demo's mmproj, then loaded and run (9 of 400 panicked before).
#[test]
fn mutated_demo_mmproj_never_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let demo = std::fs::read(cases::root().join("models/demo/mmproj-pali-demo-F16.gguf")).unwrap();
    for _ in 0..400 {
        // Mode 0 of cases::edit: the input is the whole file.
        let mut mutant = demo.clone();
        for _ in 0..1 + next() % 8 {
            let at = (next() % (64 << 10)) as usize;
            mutant[at] = next() as u8;
        }
        mutant.insert(0, 0);
        cases::gguf_mmproj(&mutant);
    }
}
