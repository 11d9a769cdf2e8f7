//! The configuration file (`central.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message} (correct or unset the variable)")]
    Env { var: String, message: String },
    #[error("config {0}: set exactly one of `database_url` and `database_url_file`")]
    DatabaseUrl(String),
    #[error("cannot read {what} file {path}: {source}")]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is empty; put the value on its first line")]
    EmptySecret { what: &'static str, path: PathBuf },
    #[error("config: `{key}` must be greater than zero")]
    Zero { key: &'static str },
}

/// The service's configuration. Unknown keys are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PostgreSQL connection string (`postgres://...` or `host=... user=...`).
    #[serde(default)]
    pub database_url: Option<String>,
    /// A file whose first line is the connection string (keeps passwords out of the config).
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// `"credentials"` (default): every `/api` request carries an issued credential.
    /// `"none"`: no authentication at all (warned about at start, hourly, and in
    /// `/metrics`); the service refuses to start without credentials unless this is set.
    #[serde(default)]
    pub auth: AuthMode,
    /// How long a replica trusts a checked credential before asking the database again:
    /// the longest a revocation takes to reach every replica. `0s` checks every request.
    #[serde(default = "default_credential_cache", with = "humantime_serde")]
    pub credential_cache: Duration,
    /// Most handles one report may name (volumes, destroyed, missing, failed, blocked);
    /// a larger report is refused with 413.
    #[serde(default = "default_max_report_handles")]
    pub max_report_handles: usize,
    /// How long a stop (SIGTERM) waits for requests in flight before cutting them.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Serve HTTPS with this certificate and key (PEM) instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How often the GC runs (one replica at a time).
    #[serde(default = "default_gc_interval", with = "humantime_serde")]
    pub gc_interval: Duration,
    /// How long a volume may be reported missing before it is marked `destroying`.
    #[serde(default = "default_missing_grace", with = "humantime_serde")]
    pub missing_grace: Duration,
    /// Database connections per replica.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// HTTP worker threads (0: one per core).
    #[serde(default)]
    pub http_workers: usize,
    /// `[log]`: `level` (a tracing filter; `RUST_LOG` wins) and `format` (`human`, `json`).
    #[serde(default)]
    pub log: protocol::settings::LogConfig,
    /// `[retention]`: fleet-wide defaults of each worker's budgets.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// `[retention]`: the defaults of the per-worker budgets the GC keeps retained caches
/// within; a worker's own setting (`PUT /api/v1/workers/{w}/retention`) wins. Absent:
/// no limit (a worker reporting `pressure` still gets room made).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Most bytes of retained caches per worker (`"50GiB"` or a number of bytes).
    #[serde(default)]
    pub cache_budget: Option<ByteSize>,
    /// Free bytes to keep on each worker's volumes file system.
    #[serde(default)]
    pub min_free: Option<ByteSize>,
}

impl RetentionConfig {
    pub fn budgets(&self) -> crate::gc::Budgets {
        crate::gc::Budgets {
            cache_budget: self.cache_budget.map(|b| b.0),
            min_free: self.min_free.map(|b| b.0),
        }
    }
}

/// A number of bytes: an integer, or a string with a unit (`"512MiB"`, `"20GB"`: units
/// are powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ByteSizeRepr")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeRepr {
    Number(u64),
    Text(String),
}

impl TryFrom<ByteSizeRepr> for ByteSize {
    type Error = String;
    fn try_from(r: ByteSizeRepr) -> Result<Self, String> {
        match r {
            ByteSizeRepr::Number(n) => Ok(ByteSize(n)),
            ByteSizeRepr::Text(s) => parse_bytes(&s).map(ByteSize),
        }
    }
}

/// Parses `"123"`, `"20GiB"`, `"512 MB"` (units are powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size; use a number of bytes or a size like \"20GiB\"");
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        None => (t, ""),
        Some(i) => (&t[..i], t[i..].trim()),
    };
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// Whether `/api` requests need a credential.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Credentials,
    None,
}

/// `[tls]`: the server's certificate chain and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate first, then any intermediates.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn default_credential_cache() -> Duration {
    Duration::from_secs(2)
}
fn default_max_report_handles() -> usize {
    1_000_000
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_gc_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_missing_grace() -> Duration {
    Duration::from_secs(300)
}
fn default_pool_size() -> usize {
    16
}

impl Config {
    /// A configuration with defaults and the given connection string.
    pub fn with_database_url(url: impl Into<String>) -> Self {
        Config {
            listen: default_listen(),
            database_url: Some(url.into()),
            database_url_file: None,
            auth: AuthMode::Credentials,
            credential_cache: default_credential_cache(),
            max_report_handles: default_max_report_handles(),
            shutdown_timeout: default_shutdown_timeout(),
            tls: None,
            gc_interval: default_gc_interval(),
            missing_grace: default_missing_grace(),
            pool_size: default_pool_size(),
            http_workers: 0,
            log: Default::default(),
            retention: RetentionConfig::default(),
        }
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with_env(path, &text, std::env::vars())
    }

    /// Parses `text` (read from `path`, used in messages) and validates it.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(path, text, Vec::new())
    }

    /// [`Self::parse`] with `VOLUME_CENTRAL_*` overrides from `env`:
    /// `VOLUME_CENTRAL_<KEY>` (`VOLUME_CENTRAL_GC_INTERVAL=10s`) and
    /// `VOLUME_CENTRAL_<SECTION>__<KEY>` (`VOLUME_CENTRAL_TLS__CERT_FILE=...`). An error in
    /// a key a variable set names the variable.
    pub fn parse_with_env(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        use protocol::settings::{parse, SettingsError};
        let config: Config = parse(text, ENV_PREFIX, env).map_err(|e| match e {
            SettingsError::File { message } => ConfigError::Parse {
                path: path.to_path_buf(),
                message: if message.contains("`token_file`") {
                    message + TOKEN_FILE_REMOVED
                } else {
                    message
                },
            },
            SettingsError::Env { var, message } => ConfigError::Env { var, message },
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.database_url.is_some() == self.database_url_file.is_some() {
            return Err(ConfigError::DatabaseUrl(path.display().to_string()));
        }
        if self.gc_interval.is_zero() {
            return Err(ConfigError::Zero { key: "gc_interval" });
        }
        if self.pool_size == 0 {
            return Err(ConfigError::Zero { key: "pool_size" });
        }
        if self.max_report_handles == 0 {
            return Err(ConfigError::Zero {
                key: "max_report_handles",
            });
        }
        Ok(())
    }

    /// The connection string, read from `database_url_file` when that is set.
    pub fn resolve_database_url(&self) -> Result<String, ConfigError> {
        match (&self.database_url, &self.database_url_file) {
            (Some(url), None) => Ok(url.clone()),
            (None, Some(file)) => read_secret("database_url", file),
            _ => Err(ConfigError::DatabaseUrl("(in memory)".into())),
        }
    }
}

/// Why an old `token_file` is refused, and what replaces it.
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "VOLUME_CENTRAL_";

const TOKEN_FILE_REMOVED: &str = "; `token_file` (one token shared by every caller) was removed: issue one credential per worker, the scheduler and operators with `volume-central credentials issue --worker NAME | --scheduler | --operator`, give each caller its own token, and delete the key";

fn read_secret(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(ConfigError::EmptySecret {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_with_durations() {
        let c = Config::parse(
            Path::new("c.toml"),
            r#"
listen = "0.0.0.0:9000"
database_url = "postgres://u@localhost/db"
auth = "none"
credential_cache = "0s"
max_report_handles = 10
shutdown_timeout = "3s"
gc_interval = "10s"
missing_grace = "2m"
pool_size = 4
[tls]
cert_file = "/etc/volume-central/cert.pem"
key_file = "/etc/volume-central/key.pem"
"#,
        )
        .expect("valid config");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.gc_interval, Duration::from_secs(10));
        assert_eq!(c.missing_grace, Duration::from_secs(120));
        assert_eq!(c.pool_size, 4);
        assert_eq!(c.auth, AuthMode::None);
        assert_eq!(c.credential_cache, Duration::ZERO);
        assert_eq!(c.max_report_handles, 10);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        assert!(c.tls.is_some());
    }

    #[test]
    fn auth_defaults_to_credentials_and_token_file_is_refused_with_the_fix() {
        let c = Config::parse(Path::new("c.toml"), "database_url = \"x\"").expect("valid");
        assert_eq!(c.auth, AuthMode::Credentials);
        assert!(c.tls.is_none());
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\ntoken_file = \"/t\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("credentials issue"), "{err}");
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\nauth = \"maybe\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("none"), "{err}");
    }

    /// The packages' `/etc/volume-central/volume-central.toml`: valid as shipped, its
    /// values are the defaults it says they are, and it names every key.
    #[test]
    fn packaged_config_is_valid_shows_the_defaults_and_names_every_key() {
        let text = include_str!("../../packaging/central/volume-central.toml");
        let path = Path::new("packaging/central/volume-central.toml");
        let shipped = Config::parse(path, text).expect("the packaged config is valid");
        let url = shipped.database_url.clone().expect("database_url set");
        let defaults = Config::parse(path, &format!("database_url = {url:?}")).expect("valid");
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
        let keys = [
            "listen",
            "database_url",
            "database_url_file",
            "auth",
            "credential_cache",
            "max_report_handles",
            "shutdown_timeout",
            "gc_interval",
            "missing_grace",
            "pool_size",
            "http_workers",
            "[tls]",
            "cert_file",
            "key_file",
            "[log]",
            "level",
            "format",
            "[retention]",
            "cache_budget",
            "min_free",
        ];
        for key in keys {
            let named = text.lines().any(|l| {
                let l = l.trim_start_matches('#');
                l == key || l.starts_with(&format!("{key} = "))
            });
            assert!(named, "the packaged config does not show `{key}`");
        }
    }

    #[test]
    fn retention_budgets_take_sizes_or_numbers_and_refuse_other_words() {
        let c = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\n[retention]\ncache_budget = \"2GiB\"\nmin_free = 1000",
        )
        .expect("valid");
        assert_eq!(c.retention.budgets().cache_budget, Some(2 << 30));
        assert_eq!(c.retention.budgets().min_free, Some(1000));
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\n[retention]\nmin_free = \"lots\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("20GiB"), "{err}");
        let c = Config::parse(Path::new("c.toml"), "database_url = \"x\"").expect("valid");
        assert_eq!(c.retention.budgets(), crate::gc::Budgets::default());
    }

    #[test]
    fn defaults_gc_interval_and_missing_grace() {
        let c = Config::parse(Path::new("c.toml"), "database_url = \"x\"").expect("valid");
        assert_eq!(c.gc_interval, Duration::from_secs(30));
        assert_eq!(c.missing_grace, Duration::from_secs(300));
    }

    #[test]
    fn rejects_unknown_key_naming_it() {
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\ngc_intervall = \"1s\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gc_intervall"), "{err}");
    }

    #[test]
    fn requires_exactly_one_database_url_source() {
        let err = Config::parse(Path::new("c.toml"), "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("database_url_file"), "{err}");
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\ndatabase_url_file = \"/f\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exactly one"), "{err}");
    }

    #[test]
    fn reads_database_url_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().join("url");
        std::fs::write(&url, "postgres://a@b/c\n").expect("write");
        let text = format!("database_url_file = {:?}", url.display().to_string());
        let c = Config::parse(Path::new("c.toml"), &text).expect("valid");
        assert_eq!(c.resolve_database_url().expect("url"), "postgres://a@b/c");
        std::fs::write(&url, "\n").expect("write");
        assert!(c.resolve_database_url().is_err());
    }

    #[test]
    fn environment_overrides_keys_and_names_the_variable_in_errors() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::parse_with_env(
            Path::new("c.toml"),
            "database_url = \"x\"",
            env(&[
                ("VOLUME_CENTRAL_GC_INTERVAL", "7s"),
                ("VOLUME_CENTRAL_POOL_SIZE", "3"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.gc_interval, std::time::Duration::from_secs(7));
        assert_eq!(c.pool_size, 3);
        let err = Config::parse_with_env(
            Path::new("c.toml"),
            "database_url = \"x\"",
            env(&[("VOLUME_CENTRAL_GC_INTERVAL", "soon")]),
        )
        .expect_err("bad duration")
        .to_string();
        assert!(
            err.contains("VOLUME_CENTRAL_GC_INTERVAL") && err.contains("gc_interval"),
            "{err}"
        );
        let err = Config::parse_with_env(
            Path::new("c.toml"),
            "database_url = \"x\"",
            env(&[("VOLUME_CENTRAL_NOPE", "1")]),
        )
        .expect_err("unknown key")
        .to_string();
        assert!(err.contains("VOLUME_CENTRAL_NOPE"), "{err}");
        let err = Config::parse(
            Path::new("c.toml"),
            "database_url = \"x\"\npool_size = \"many\"",
        )
        .expect_err("bad file value")
        .to_string();
        assert!(err.contains("c.toml") && err.contains("pool_size"), "{err}");
    }
}
