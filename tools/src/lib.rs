//! Generators for the `kith` command's man pages and shell completions.
//!
//! Both come from the same clap definition the binary parses with
//! ([`kith_node::cli::command`]), so they cannot drift from the real flags.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writes `kith.1` and one page per subcommand (`kith-group-create.1`, …) into `dir`.
/// Returns the files written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = kith_node::cli::command();
    let mut written = Vec::new();
    write_page(&cmd, "kith", dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd.clone();
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .title(name.to_owned())
        .render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

/// Writes completion scripts for bash, zsh, fish, elvish and PowerShell into `dir`.
pub fn write_completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::Elvish,
        Shell::PowerShell,
    ] {
        let mut cmd = kith_node::cli::command();
        written.push(clap_complete::generate_to(shell, &mut cmd, "kith", dir)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_man_pages(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "kith.1",
            "kith-run.1",
            "kith-join.1",
            "kith-group-create.1",
            "kith-invite.1",
            "kith-watch.1",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        let main = std::fs::read_to_string(dir.path().join("kith.1")).unwrap();
        assert!(main.contains(".TH kith"), "not a man page");
        assert!(
            main.contains("data\\-dir"),
            "global --data-dir flag is documented"
        );
    }

    #[test]
    fn completions_name_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_completions(dir.path()).unwrap();
        assert_eq!(files.len(), 5);
        let bash = std::fs::read_to_string(dir.path().join("kith.bash")).unwrap();
        assert!(bash.contains("join") && bash.contains("history"));
    }
}
