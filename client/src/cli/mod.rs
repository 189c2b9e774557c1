//! The `polyhead` command line: argument definitions, dispatch and error reporting.

mod analyze;
mod credentials;
mod detect;
mod layout;
mod models;
mod progress;
mod render;
mod segment;
mod video;
mod windows;

use std::ffi::OsString;
use std::io::{self, Write};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use polyhead_client::{Client, ClientError, ClientOptions, DEFAULT_SERVER, Deadline};
use serde::Serialize;

/// Help section of the options every subcommand accepts.
const GLOBAL: &str = "Global options";

/// Command-line client of the polyhead inference service: one vision backbone, many task heads.
#[derive(Debug, Parser)]
#[command(name = "polyhead", version)]
pub struct Cli {
    /// Server address, `host:port`, `http://host:port` or `https://host:port`.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "ADDR"
    )]
    pub server: String,
    /// One deadline for the whole command, in seconds from its start: connecting (with its
    /// retries) and every call (with its retries, a video streamed in windows included) must be
    /// done within it; each call is sent what is left of it as its gRPC deadline.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_TIMEOUT",
        default_value = "30",
        value_name = "SECS",
        value_parser = parse_secs
    )]
    pub timeout: Duration,
    /// How many times connecting, or a call the server refuses for now (UNAVAILABLE,
    /// RESOURCE_EXHAUSTED), is retried within --timeout; 0 disables retries.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_RETRIES",
        default_value_t = 3,
        value_name = "N"
    )]
    pub retries: u32,
    /// Print the response as JSON instead of text.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// TLS and authentication.
    #[command(flatten)]
    pub credentials: credentials::CredentialArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect objects in an image (boxes, scores, optional instance masks).
    Detect(detect::DetectArgs),
    /// Segment an image into a per-pixel class map.
    Segment(segment::SegmentArgs),
    /// Recognise the action in a video clip or a sequence of frames.
    Video(video::VideoArgs),
    /// Run several heads on one image from a single backbone pass.
    Analyze(analyze::AnalyzeArgs),
    /// Show the loaded model set: the backbone and its heads.
    Models(models::ModelsArgs),
}

impl Cli {
    /// Parses and validates the arguments; errors are clap errors (exit code 2).
    pub fn try_parse_valid<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Self::try_parse_from(args)?;
        if let Command::Video(video) = &cli.command {
            video.validate()?;
        }
        Ok(cli)
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Set once, so that connecting, its retries and every call share the one --timeout.
    let deadline = Deadline::after(cli.timeout);
    let out = Output { json: cli.json };
    let session = Session {
        server: cli.server,
        options: ClientOptions {
            timeout: cli.timeout,
            deadline: Some(deadline),
            tls: cli.credentials.tls()?,
            token: cli.credentials.token,
            max_retries: cli.retries,
            ..ClientOptions::default()
        },
    };
    match cli.command {
        Command::Detect(args) => detect::run(&session, &out, args).await,
        Command::Segment(args) => segment::run(&session, &out, args).await,
        Command::Video(args) => video::run(&session, &out, args).await,
        Command::Analyze(args) => analyze::run(&session, &out, args).await,
        Command::Models(args) => models::run(&session, &out, args).await,
    }
}

/// Where and how to connect, and the deadline of the command.
pub(crate) struct Session {
    server: String,
    options: ClientOptions,
}

impl Session {
    /// Connects to the server, within what is left of the command's deadline.
    pub(crate) async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.server, self.options.clone()).await
    }
}

/// How results are printed.
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `text()` otherwise.
    pub(crate) fn emit<T: Serialize>(
        &self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        let mut rendered = if self.json {
            serde_json::to_string_pretty(value).context("cannot serialise the response")?
        } else {
            text()
        };
        if !rendered.ends_with('\n') {
            rendered.push('\n');
        }
        write_stdout(&rendered)
    }
}

/// Writes to stdout; a closed pipe (`polyhead models | head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            Err(err).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// The one-line message for an error: its context chain, down to the first [`ClientError`],
/// whose message is complete on its own.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        parts.push(cause.to_string());
        if cause.downcast_ref::<ClientError>().is_some() {
            break;
        }
    }
    parts.join(": ")
}

/// Parses a positive number of seconds, fractions allowed.
fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("must be more than 0 seconds".to_owned());
    }
    Duration::try_from_secs_f64(secs).map_err(|err| err.to_string())
}

/// Parses a fraction in [0, 1].
fn parse_unit(text: &str) -> Result<f32, String> {
    let value = parse_number(text)?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0 and 1".to_owned())
    }
}

/// A number in (0, 1], as the server takes an IoU threshold.
fn parse_positive_unit(text: &str) -> Result<f32, String> {
    let value = parse_number(text)?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err("must be above 0 and at most 1".to_owned())
    }
}

fn parse_number(text: &str) -> Result<f32, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_valid(std::iter::once("polyhead").chain(args.iter().copied()))
    }

    #[test]
    fn global_flags_go_anywhere() -> Result<(), clap::Error> {
        let cli = parse(&["models", "--server", "http://10.0.0.2:9000", "--json"])?;
        assert_eq!(cli.server, "http://10.0.0.2:9000");
        assert!(cli.json);
        let cli = parse(&["--timeout", "2.5", "models"])?;
        assert_eq!(cli.timeout, Duration::from_millis(2500));
        let cli = parse(&["models", "--retries", "0"])?;
        assert_eq!(cli.retries, 0);
        Ok(())
    }

    #[test]
    fn defaults() -> Result<(), clap::Error> {
        if std::env::var_os("POLYHEAD_SERVER").is_some()
            || std::env::var_os("POLYHEAD_TIMEOUT").is_some()
            || std::env::var_os("POLYHEAD_RETRIES").is_some()
        {
            return Ok(());
        }
        let cli = parse(&["models"])?;
        assert_eq!(cli.server, "127.0.0.1:50051");
        assert_eq!(cli.timeout, Duration::from_secs(30));
        assert_eq!(cli.retries, 3);
        assert!(!cli.json);
        Ok(())
    }

    #[test]
    fn bad_values_are_usage_errors() {
        let kind = |args: &[&str]| parse(args).err().map(|e| e.kind());
        assert_eq!(
            kind(&["--timeout", "0", "models"]),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(
            kind(&["--timeout", "soon", "models"]),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(
            kind(&["detect", "a.jpg", "--score-threshold", "1.5"]),
            Some(ErrorKind::ValueValidation)
        );
        // The server takes an IoU threshold in (0, 1].
        assert_eq!(
            kind(&["detect", "a.jpg", "--iou-threshold", "0"]),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(kind(&["detect", "a.jpg", "--score-threshold", "0"]), None);
        assert_eq!(kind(&["detect", "a.jpg", "--iou-threshold", "1"]), None);
        assert_eq!(kind(&["detect"]), Some(ErrorKind::MissingRequiredArgument));
        assert_eq!(kind(&["frobnicate"]), Some(ErrorKind::InvalidSubcommand));
        assert_eq!(
            kind(&[]),
            Some(ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
        );
    }

    #[test]
    fn errors_stop_at_the_client_error() {
        let client = ClientError::Status(tonic::Status::unavailable("draining"));
        let error = anyhow::Error::new(client).context("analyze");
        assert_eq!(
            render_error(&error),
            "analyze: server unavailable: draining"
        );
        let io = anyhow::Error::new(io::Error::other("disk full")).context("cannot write map.png");
        assert_eq!(render_error(&io), "cannot write map.png: disk full");
    }

    #[test]
    fn credential_flags_parse() -> Result<(), clap::Error> {
        let cli = parse(&[
            "models",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-domain",
            "polyhead.internal",
            "--token",
            "abc",
        ])?;
        let credentials = &cli.credentials;
        assert_eq!(
            credentials.tls_ca.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
        assert_eq!(credentials.tls_domain.as_deref(), Some("polyhead.internal"));
        assert_eq!(credentials.token.as_deref(), Some("abc"));
        let kind = |args: &[&str]| parse(args).err().map(|e| e.kind());
        assert_eq!(
            kind(&["models", "--tls-cert", "c.pem", "--tls-ca", "ca.pem"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        Ok(())
    }

    #[test]
    fn help_renders() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
