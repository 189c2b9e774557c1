//! Where the configuration comes from: defaults < config file (TOML) < environment (`POLYHEAD_*`)
//! < flags. clap resolves flags, environment and defaults; a file value is used only for an
//! option that neither a flag nor the environment set.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::config::Config;

/// Keys whose values are never printed.
const SECRET_WORDS: &[&str] = &["token", "secret", "password", "key"];

/// Parses the effective configuration from `args` (the first is the program name).
pub fn parse<I, T>(args: I) -> Result<Config, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = Config::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some(file) = matches.get_one::<std::path::PathBuf>("config") else {
        return Config::from_arg_matches(&matches);
    };
    let from_file = file_args(file, &command, &matches).map_err(|message| {
        command
            .clone()
            .error(clap::error::ErrorKind::InvalidValue, message)
    })?;
    let mut layered = args[..1].to_vec();
    layered.extend(from_file);
    layered.extend(args[1..].iter().cloned());
    Config::from_arg_matches(&command.try_get_matches_from(layered)?)
}

/// The file's settings as flags, for the options still at their defaults.
fn file_args(
    file: &Path,
    command: &clap::Command,
    matches: &ArgMatches,
) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read the config file {}: {e}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| format!("{}: unknown key '{key}'", file.display()))?;
        // Only options that neither a flag nor the environment set (those with no default at
        // all included) take the file's value.
        let source = matches.value_source(arg.get_id().as_str());
        if !matches!(source, None | Some(ValueSource::DefaultValue)) {
            continue;
        }
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        args.extend(
            flag(&long, &value, is_switch)
                .map_err(|e| format!("{}: {key}: {e}", file.display()))?,
        );
    }
    Ok(args)
}

fn flag(long: &str, value: &toml::Value, is_switch: bool) -> Result<Vec<OsString>, String> {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) if is_switch => {
            return Ok(if *b {
                vec![format!("--{long}").into()]
            } else {
                Vec::new()
            });
        }
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "expected a string, number or boolean, found {}",
                other.type_str()
            ));
        }
    };
    Ok(vec![format!("--{long}={text}").into()])
}

/// The effective configuration as TOML, with secret values redacted.
pub fn render(config: &Config) -> String {
    let mut table = match toml::Table::try_from(config) {
        Ok(table) => table,
        Err(e) => return format!("# cannot render the configuration: {e}\n"),
    };
    for (key, value) in table.iter_mut() {
        if SECRET_WORDS.iter().any(|w| key.contains(w)) {
            *value = toml::Value::String("<redacted>".into());
        }
    }
    toml::to_string(&table).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn file_values_sit_between_defaults_and_flags() {
        let f = file(
            "max-frames = 12\nmax_top_k = 7\nqueue-capacity = 9\nallow-cpu-fallback = true\n\
             ort-dylib = \"/opt/ort/libonnxruntime.so\"\n",
        );
        let path = f.path().to_str().expect("utf-8 path");
        let config =
            parse(["polyhead-server", "--config", path, "--max-frames", "20"]).expect("parse");
        assert_eq!(config.limits.max_frames, 20, "a flag beats the file");
        assert_eq!(config.limits.max_top_k, 7, "the file beats the default");
        assert_eq!(config.runtime.queue_capacity, 9);
        assert!(config.runtime.allow_cpu_fallback);
        assert_eq!(
            config.runtime.ort_dylib.as_deref(),
            Some(Path::new("/opt/ort/libonnxruntime.so")),
            "options without a default are taken from the file too"
        );
        assert_eq!(config.limits.max_clip_side, 4096, "defaults stay");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file("max-framez = 12\n");
        let path = f.path().to_str().expect("utf-8 path");
        let err = parse(["polyhead-server", "--config", path]).expect_err("unknown key");
        assert!(err.to_string().contains("max-framez"), "{err}");
        let f = file("max-frames = \"many\"\n");
        let path = f.path().to_str().expect("utf-8 path");
        let err = parse(["polyhead-server", "--config", path]).expect_err("bad value");
        assert!(err.to_string().contains("many"), "{err}");
    }

    #[test]
    fn render_round_trips_through_the_file_format() {
        let config = parse([
            "polyhead-server",
            "--max-frames",
            "33",
            "--device",
            "cuda:1",
        ])
        .expect("parse");
        let text = render(&config);
        assert!(
            text.contains("max-frames = 33") && text.contains("device = \"cuda:1\""),
            "{text}"
        );
        let f = file(&text);
        let path = f.path().to_str().expect("utf-8 path");
        let again = parse(["polyhead-server", "--config", path]).expect("re-parse");
        assert_eq!(render(&again), text);
    }
}
