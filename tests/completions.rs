//! Shell completions and the manual page, generated from the CLI definition.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_authkeeper")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_know_every_subcommand_and_bash_can_load_them() {
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for sub in ["connect", "status", "token", "keygen", "completions"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("authkeeper.bash");
    std::fs::write(&file, run(&["completions", "bash"])).unwrap();
    // Loaded into bash, the completion function is defined and completes a subcommand.
    let probe = format!(
        "source {}; COMP_WORDS=(authkeeper conn); COMP_CWORD=1; _authkeeper authkeeper conn authkeeper; echo \"${{COMPREPLY[@]}}\"",
        file.display()
    );
    let out = Command::new("bash").arg("-c").arg(probe).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connect");
    let out = Command::new(env!("CARGO_BIN_EXE_authkeeper")).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn the_manual_page_covers_every_subcommand() {
    let page = run(&["man"]);
    assert!(page.contains(".TH authkeeper 1"), "a roff page");
    for sub in ["daemon", "connect", "token", "keygen"] {
        assert!(page.contains(sub), "the page lists {sub}");
    }
    let dir = tempfile::tempdir().unwrap();
    run(&["man", "--dir", dir.path().to_str().unwrap()]);
    for page in ["authkeeper.1", "authkeeper-connect.1", "authkeeper-daemon.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is a roff page");
    }
    let daemon = std::fs::read_to_string(dir.path().join("authkeeper-daemon.1")).unwrap();
    assert!(daemon.contains("secrets\\-key\\-file"), "the daemon's page documents its options");
}
