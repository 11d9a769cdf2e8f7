//! Both binaries' configuration the same way: a TOML text, environment overrides
//! (`<PREFIX><KEY>` for a top-level key, `<PREFIX><SECTION>__<KEY>` for a key in a
//! section), and deserialization whose errors name the key — and, when an environment
//! variable set that key, the variable instead of the file. Pure: the caller reads the
//! file and passes the environment.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; without its own timestamp under systemd's
    /// journal (`JOURNAL_STREAM` set), which stamps every line itself.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]` of both binaries; both keys are optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `volume_agent=debug`); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// Where a configuration error comes from, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The file's text or one of its keys.
    #[error("{message}")]
    File { message: String },
    /// A variable of the environment (its own shape, or the key it set).
    #[error("environment variable {var}: {message} (correct or unset the variable)")]
    Env { var: String, message: String },
}

/// Which key each environment variable set (`section.key` or `key`, lower case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides(Vec<(String, String)>);

impl Overrides {
    /// The variable that set `key`, or the unknown field `message` complains about.
    fn var_for(&self, key: &str, message: &str) -> Option<&str> {
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'))
            .map(|(field, _)| {
                if key == "." {
                    field.to_string()
                } else {
                    format!("{key}.{field}")
                }
            });
        self.0
            .iter()
            .find(|(k, _)| k == key || unknown.as_deref() == Some(k.as_str()))
            .map(|(_, var)| var.as_str())
    }
}

/// Applies the overrides among `env` whose names start with `prefix` to `table`.
pub fn apply_env(
    prefix: &str,
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Overrides, SettingsError> {
    let mut set = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(prefix) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let (section, key) = match rest.split_once("__") {
            Some((s, k)) => (Some(s.to_string()), k.to_string()),
            None => (None, rest),
        };
        if key.is_empty() || section.as_deref().is_some_and(str::is_empty) {
            return Err(SettingsError::Env {
                var,
                message: format!("expected {prefix}KEY or {prefix}SECTION__KEY"),
            });
        }
        // A TOML literal (number, boolean, quoted string, array) when it parses as one,
        // else the text as a string.
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let target = match &section {
            None => &mut *table,
            Some(s) => match table
                .entry(s.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(SettingsError::Env {
                        var,
                        message: format!("`{s}` is not a section"),
                    })
                }
            },
        };
        let path = match &section {
            Some(s) => format!("{s}.{key}"),
            None => key.clone(),
        };
        target.insert(key, value);
        set.push((path, var));
    }
    Ok(Overrides(set))
}

/// Parses `text`, applies the overrides of `env` under `prefix`, and deserializes. An
/// error names the key (`key `gc.max_in_flight`: ...`), and the variable when one set it.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| SettingsError::File {
                message: e.message().to_string(),
            })?;
    let overrides = apply_env(prefix, &mut table, env)?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().message().to_string();
        let message = if key == "." {
            message
        } else {
            format!("key `{key}`: {message}")
        };
        match overrides.var_for(&key, &message) {
            Some(var) => SettingsError::Env {
                var: var.to_string(),
                message,
            },
            None => SettingsError::File { message },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        name: String,
        #[serde(default)]
        gc: Gc,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Gc {
        #[serde(default)]
        max: u32,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_keys_and_sections() {
        let c: Conf = parse(
            "name = \"a\"\n",
            "APP_",
            env(&[("APP_NAME", "b"), ("APP_GC__MAX", "7"), ("OTHER", "x")]),
        )
        .expect("parse");
        assert_eq!(
            c,
            Conf {
                name: "b".into(),
                gc: Gc { max: 7 }
            }
        );
    }

    #[test]
    fn errors_name_the_variable_that_set_the_key_else_the_key() {
        let err = parse::<Conf>("name = \"a\"\n", "APP_", env(&[("APP_GC__MAX", "lots")]))
            .expect_err("bad value");
        assert!(
            matches!(&err, SettingsError::Env { var, .. } if var == "APP_GC__MAX"),
            "{err}"
        );
        assert!(err.to_string().contains("gc.max"), "{err}");
        let err = parse::<Conf>("name = \"a\"\n", "APP_", env(&[("APP_GC__NOPE", "1")]))
            .expect_err("unknown key");
        assert!(
            matches!(&err, SettingsError::Env { var, .. } if var == "APP_GC__NOPE"),
            "{err}"
        );
        let err = parse::<Conf>("name = \"a\"\n[gc]\nmax = \"x\"\n", "APP_", Vec::new())
            .expect_err("bad file value");
        assert!(
            matches!(&err, SettingsError::File { message } if message.contains("gc.max")),
            "{err}"
        );
        let err = parse::<Conf>("name = \"a\"\n", "APP_", env(&[("APP___X", "1")]))
            .expect_err("empty section");
        assert!(err.to_string().contains("APP_SECTION__KEY"), "{err}");
    }
}
