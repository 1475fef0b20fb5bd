//! Shell completions and man pages for both binaries, generated from their clap definitions
//! (`switchyard completions bash`, `proxyctl man`), so they never drift from the real flags.

use clap_complete::Shell;
use std::io::Write;

/// Write the completion script of `cmd` for `shell` to `out`.
pub fn completions(shell: Shell, mut cmd: clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Write the man page (roff, section 1) of `cmd` to `out`, with one section per subcommand so
/// `man proxyctl` documents `switch --drain` as well as the global flags.
pub fn man(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    for sub in cmd.get_subcommands().filter(|s| shown(s)) {
        subcommand_section(&cmd, sub, out)?;
    }
    man.render_extra_section(out)?;
    if cmd.get_version().is_some() {
        man.render_version_section(out)?;
    }
    Ok(())
}

/// Hidden subcommands and clap's own `help` get no section.
fn shown(sub: &clap::Command) -> bool {
    !sub.is_hide_set() && sub.get_name() != "help"
}

/// One `.SH` section per subcommand: its synopsis, about text and options; nested
/// subcommands (`proxyctl pool set`) follow as their own sections.
fn subcommand_section(
    parent: &clap::Command,
    sub: &clap::Command,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    // `build()` gave every subcommand its full name (`proxyctl pool set`) as its bin name.
    let full = sub
        .get_bin_name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{} {}", parent.get_name(), sub.get_name()));
    let page = clap_mangen::Man::new(sub.clone());
    let mut buf = Vec::new();
    page.render_synopsis_section(&mut buf)?;
    page.render_description_section(&mut buf)?;
    page.render_options_section(&mut buf)?;
    // Each rendered section starts with `.SH NAME`; make them sub-sections of this command.
    let text = String::from_utf8_lossy(&buf).replace(".SH ", ".SS ");
    writeln!(out, ".SH \"{}\"", full.to_uppercase())?;
    out.write_all(text.as_bytes())?;
    for nested in sub.get_subcommands().filter(|s| shown(s)) {
        subcommand_section(sub, nested, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("tool")
            .about("A tool.")
            .arg(clap::Arg::new("socket").long("socket").help("The socket."))
            .subcommand(
                clap::Command::new("switch")
                    .about("Switch the pool.")
                    .arg(clap::Arg::new("drain").long("drain").help("Then drain.")),
            )
            .subcommand(
                clap::Command::new("pool")
                    .subcommand(clap::Command::new("set").about("Replace instances.")),
            )
    }

    #[test]
    fn man_page_documents_every_subcommand_and_its_flags() {
        let mut out = Vec::new();
        man(cli(), &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.starts_with(".ie") || text.contains(".TH tool 1"),
            "{text}"
        );
        for needle in [
            "\\-\\-socket",
            ".SH \"TOOL SWITCH\"",
            "Switch the pool.",
            "\\-\\-drain",
            ".SH \"TOOL POOL SET\"",
            "Replace instances.",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn bash_completion_names_the_subcommands() {
        let mut out = Vec::new();
        completions(Shell::Bash, cli(), &mut out);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("complete -F _tool"), "{text}");
        assert!(
            text.contains("switch") && text.contains("--drain"),
            "{text}"
        );
    }
}
