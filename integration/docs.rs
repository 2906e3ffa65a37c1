//! `pitr completions` and `pitr man`: generated from the command line, with no repository.

use std::process::Command;

use crate::harness::{Scratch, code, pitr, run, stderr};

/// The commands an operator types most; each must be in the completions and have a page.
const COMMANDS: [&str; 8] = [
    "archive-push",
    "archive-get",
    "backup",
    "restore",
    "verify",
    "drill",
    "expire",
    "receive",
];

#[test]
fn completions_parse_in_their_shell_and_name_every_command() {
    let s = Scratch::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = pitr(s.path(), &["completions", shell], &[]);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout).into_owned();
        for c in COMMANDS {
            assert!(script.contains(c), "{shell} completion lacks {c}");
        }
        // Where the shell is installed, it must accept the script's syntax.
        let check = match shell {
            "bash" => Some(("bash", "-n")),
            "zsh" => Some(("zsh", "-n")),
            "fish" => Some(("fish", "--no-execute")),
            _ => None,
        };
        if let Some((program, flag)) = check
            && Command::new(program).arg("--version").output().is_ok()
        {
            let file = s.path().join(format!("pitr.{shell}"));
            std::fs::write(&file, &script).unwrap();
            let out = run(Command::new(program).arg(flag).arg(&file));
            assert!(
                out.status.success(),
                "{program} rejects the completion: {}",
                stderr(&out)
            );
            println!(
                "{shell}: {} bytes, accepted by {program} {flag}",
                script.len()
            );
        }
    }
    let out = pitr(s.path(), &["completions", "tcsh"], &[]);
    assert_eq!(code(&out), 2, "an unknown shell is a usage error");
}

#[test]
fn man_writes_a_page_per_command() {
    let s = Scratch::new();
    let out = pitr(s.path(), &["man"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(page.contains(".TH pitr 1"), "{page}");
    let dir = s.path().join("man1");
    let out = pitr(s.path(), &["man", "--dir", dir.to_str().unwrap()], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for c in COMMANDS.iter().chain(&["key-generate"]) {
        let path = dir.join(format!("pitr-{c}.1"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains(&format!(".TH pitr-{c} 1")), "{text}");
        assert!(text.contains(".SH OPTIONS"), "{text}");
    }
    // Rendered by man itself where it is installed.
    if Command::new("man").arg("--version").output().is_ok() {
        let out = run(Command::new("man")
            .arg("-l")
            .arg(dir.join("pitr-restore.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--target-dir"), "{text}");
    }
    // A directory that cannot be made is named.
    let file = s.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = pitr(
        s.path(),
        &["man", "--dir", file.join("sub").to_str().unwrap()],
        &[],
    );
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("a-file"), "{}", stderr(&out));
}

#[test]
fn the_command_pages_in_docs_are_current() {
    let s = Scratch::new();
    let dir = s.path().join("commands");
    let out = pitr(
        s.path(),
        &[
            "man",
            "--format",
            "markdown",
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/commands");
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dir), names(&committed), "pages added or removed");
    for name in names(&dir) {
        let want = std::fs::read_to_string(dir.join(&name)).unwrap();
        let have = std::fs::read_to_string(committed.join(&name)).unwrap();
        assert!(
            want == have,
            "docs/commands/{name} is not what the command line says: regenerate with `pitr man --format markdown --dir docs/commands`"
        );
    }
}
