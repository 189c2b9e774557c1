//! The library and the `polyhead` binary against an in-process mock server with canned answers:
//! deadlines, retries, status mapping, connection errors, output formats and exit codes.

mod budget;
mod cli;
mod connect;
mod library;
mod mock;
mod proxy;
mod streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

/// Runs the `polyhead` binary with `args` and nothing of the polyhead environment but `env`;
/// killed after a minute, so that a hang fails the test rather than stopping it.
async fn polyhead_with(args: Vec<String>, env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_polyhead"));
    command.args(args).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("POLYHEAD_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await??;
    Ok(output)
}

/// Runs the `polyhead` binary with `args`.
async fn polyhead(args: Vec<String>) -> anyhow::Result<Output> {
    polyhead_with(args, &[]).await
}

fn args(addr: SocketAddr, rest: &[&str]) -> Vec<String> {
    let mut all = vec!["--server".to_owned(), addr.to_string()];
    all.extend(rest.iter().map(|s| (*s).to_owned()));
    all
}

fn temp_file(name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("polyhead-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
