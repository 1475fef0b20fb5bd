//! `proxyctl`: the control client (SPEC §5). The commands arrive with the control socket
//! (issue 3); this version only describes itself.

use clap::Parser;

/// Control a running switchyard proxy through its control socket.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Control socket path.
    #[arg(long, env = "SWITCHYARD_SOCKET", default_value = "./switchyard.sock")]
    socket: std::path::PathBuf,
}

fn main() {
    let cli = Cli::parse();
    eprintln!(
        "proxyctl: no command given (socket {}); see --help",
        cli.socket.display()
    );
    std::process::exit(2);
}
