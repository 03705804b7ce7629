//! `kith-gen`: writes the `kith` man pages and shell completions.
//!
//! Usage: `kith-gen man DIR` or `kith-gen completions DIR`.

use std::path::PathBuf;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(what), Some(dir)) = (args.next(), args.next()) else {
        bail!("usage: kith-gen man|completions DIR");
    };
    let dir = PathBuf::from(dir);
    let files = match what.as_str() {
        "man" => kith_tools::write_man_pages(&dir),
        "completions" => kith_tools::write_completions(&dir),
        other => bail!("unknown target '{other}'; expected 'man' or 'completions'"),
    }
    .with_context(|| format!("writing into {}", dir.display()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
