//! The agent's configuration: TOML, every key defaulted except `worker_name` and
//! `central.url`, humantime durations, unknown keys rejected by name, and environment
//! overrides for container use.
//!
//! Environment overrides: `VOLUME_AGENT_<KEY>` for a top-level key and
//! `VOLUME_AGENT_<SECTION>__<KEY>` for a key in a section, e.g.
//! `VOLUME_AGENT_WORKER_NAME=w1`, `VOLUME_AGENT_CENTRAL__POLL_INTERVAL=10s`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The placeholder worker name shipped in the packaged config; the agent refuses to run
/// with it, so two workers never report under one name.
pub const PLACEHOLDER_WORKER: &str = "CHANGE-ME";

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "VOLUME_AGENT_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub worker_name: String,
    pub central: CentralConfig,
    #[serde(default)]
    pub volumes: VolumesConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub p2p: P2pConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub resource_types: ResourceTypesConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    #[default]
    Native,
    Concourse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    pub url: String,
    #[serde(default)]
    pub dialect: Dialect,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default = "d30s", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "d30s", with = "humantime_serde")]
    pub report_interval: Duration,
    #[serde(default = "d5s", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "d30s", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest response body accepted, in bytes.
    #[serde(default = "d64mib")]
    pub max_body_bytes: u64,
    /// Longest wait between polls after errors.
    #[serde(default = "d5m", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// PEM certificates trusted for `https://` central URLs, added to the system trust
    /// store (an internal CA). See [`crate::central::tls`].
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverName {
    Naive,
    Overlay,
    #[default]
    Detect,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    pub root: PathBuf,
    pub driver: DriverName,
    /// How often records are compared with their directories (drift); also at start.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        VolumesConfig {
            root: default_volumes_root(),
            driver: DriverName::default(),
            scan_interval: d1m(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub dir: PathBuf,
    /// sled's page cache, in bytes (sled defaults to 1 GiB; far too much for an agent).
    pub cache_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            cache_bytes: d32mib(),
        }
    }
}

/// Where the local API listens: a TCP address (`127.0.0.1:7788`) or a unix socket
/// (`unix:/run/volume-agent/api.sock`, an absolute path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            return if path.is_absolute() {
                Ok(Listen::Unix(path))
            } else {
                Err(format!(
                    "{s:?}: a unix socket needs an absolute path, e.g. \"unix:/run/volume-agent/api.sock\""
                ))
            };
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!(
                "{s:?}: expected an address like \"127.0.0.1:7788\" or a unix socket like \"unix:/run/volume-agent/api.sock\""
            )
        })
    }
}

impl From<Listen> for String {
    fn from(l: Listen) -> String {
        l.to_string()
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Listen {
    /// The base of the API's URLs for `volume-agent` commands: `http://ADDR`, or
    /// `unix:PATH` (see [`crate::ctl::Ctl::new`]).
    pub fn api_base(&self) -> String {
        match self {
            Listen::Tcp(addr) => format!("http://{addr}"),
            Listen::Unix(_) => self.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `127.0.0.1:7788` or `unix:/ABSOLUTE/PATH`.
    pub listen: Listen,
    /// Largest request body accepted by the local API, in bytes (stream-in excepted).
    pub max_body_bytes: u64,
    /// Peer uids served (unix socket: `SO_PEERCRED`; loopback TCP: the owner of the
    /// peer's socket as `sock_diag` reports it). Everyone else gets 403.
    pub allowed_uids: Vec<u32>,
    /// Peer groups served as well: a uid whose primary or supplementary groups (from the
    /// user database) include one of these.
    pub allowed_groups: Vec<u32>,
    /// Group of the unix socket (name or number); empty = the agent's group. The socket's
    /// mode is always 0660.
    pub group: String,
    /// A listen address that is not loopback is refused unless this is true.
    pub allow_remote: bool,
    /// `import` reads only beneath these directories; empty = `resource_types.dir`.
    pub import_roots: Vec<PathBuf>,
    /// Streams (in and out) running at once, on threads of their own; more answer 503.
    pub max_streams: usize,
    /// A stream-in body that sends nothing (or a stream-out client that reads nothing) for
    /// this long is cut.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Most bytes of file data one stream-in may write (apparent sizes); unset = no limit.
    pub stream_in_max_bytes: Option<u64>,
    /// Most tar entries one stream-in may hold; unset = no limit.
    pub stream_in_max_entries: Option<u64>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            max_body_bytes: d1mib(),
            allowed_uids: d_root_only(),
            allowed_groups: Vec::new(),
            group: String::new(),
            allow_remote: false,
            import_roots: Vec::new(),
            max_streams: default_max_streams(),
            body_idle_timeout: d60s(),
            stream_in_max_bytes: None,
            stream_in_max_entries: None,
        }
    }
}

fn default_max_streams() -> usize {
    64
}

fn d60s() -> Duration {
    Duration::from_secs(60)
}

/// `[p2p]`: worker-to-worker streaming, as Concourse uses it when P2P volume streaming is
/// on. Off while `listen` is empty. The listener is separate from the local API and serves
/// only `PUT /volumes/{handle}/stream-in`, to peers in `allowed_networks`, into volumes
/// that nothing has read yet (see `api::p2p`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct P2pConfig {
    /// `IP:PORT` of the peer listener, e.g. `0.0.0.0:7789`; empty = off.
    pub listen: ListenOrOff,
    /// The host other workers reach this one at (an IP address or a DNS name), as
    /// `GET /p2p-url` answers it. Empty = `interface`, or the listen IP when specific.
    pub address: String,
    /// A network interface whose first address (IPv4 preferred) is the host `GET
    /// /p2p-url` answers, looked up on each call as baggageclaim does.
    pub interface: String,
    /// Peers allowed to stream in (`10.0.0.0/8`, `fd00::/8`, `192.0.2.7/32`); empty =
    /// every peer refused.
    pub allowed_networks: Vec<ipnet::IpNet>,
}

/// `[metrics]`: a listener of its own for Prometheus, off while `listen` is empty. It
/// serves only `GET /metrics`, to anyone who reaches it (no peer check: a remote
/// Prometheus has no local uid), so bind it where only the scraper reaches; the local API
/// keeps serving `/metrics` behind its guard either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT`, e.g. `10.0.3.17:9788`; empty = off.
    pub listen: ListenOrOff,
}

/// `p2p.listen`, `metrics.listen`: an `IP:PORT` address, or off when empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub struct ListenOrOff(pub Option<SocketAddr>);

impl TryFrom<String> for ListenOrOff {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Ok(ListenOrOff(None));
        }
        t.parse().map(|a| ListenOrOff(Some(a))).map_err(|_| {
            format!("{s:?} is not an IP:PORT address (e.g. \"0.0.0.0:7789\"); leave it empty to turn this listener off")
        })
    }
}

impl From<ListenOrOff> for String {
    fn from(l: ListenOrOff) -> String {
        l.0.map(|a| a.to_string()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceTypesConfig {
    pub dir: PathBuf,
    /// How often the folder is rescanned for changes.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
}

impl Default for ResourceTypesConfig {
    fn default() -> Self {
        ResourceTypesConfig {
            dir: default_resource_types_dir(),
            rescan_interval: d2s(),
        }
    }
}

/// A free-space floor: a percentage of the filesystem (`"10%"`) or a size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MinFree {
    Percent(f64),
    Bytes(u64),
}

impl MinFree {
    /// The floor in bytes on a file system of `total` bytes.
    pub fn bytes_of(&self, total: u64) -> u64 {
        match *self {
            MinFree::Percent(p) => ((total as f64) * p / 100.0).ceil() as u64,
            MinFree::Bytes(b) => b,
        }
    }

    /// Whether `free` of `total` bytes is below the floor.
    pub fn is_below(&self, free: u64, total: u64) -> bool {
        match *self {
            MinFree::Percent(p) => total > 0 && (free as f64) < (total as f64) * p / 100.0,
            MinFree::Bytes(b) => free < b,
        }
    }
}

impl TryFrom<String> for MinFree {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(MinFree::Percent(v)),
                _ => Err(format!("min_free {s:?}: a percentage must be 0% to 100%")),
            };
        }
        let (num, mult) = match t.find(|c: char| !c.is_ascii_digit()) {
            None => (t, 1u64),
            Some(i) => {
                let mult = match t[i..].trim().to_ascii_lowercase().as_str() {
                    "b" => 1,
                    "k" | "kb" | "kib" => 1 << 10,
                    "m" | "mb" | "mib" => 1 << 20,
                    "g" | "gb" | "gib" => 1 << 30,
                    "t" | "tb" | "tib" => 1 << 40,
                    _ => {
                        return Err(format!(
                        "min_free {s:?}: use a percentage like \"10%\" or a size like \"20GiB\""
                    ))
                    }
                };
                (&t[..i], mult)
            }
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(MinFree::Bytes)
            .ok_or_else(|| {
                format!("min_free {s:?}: use a percentage like \"10%\" or a size like \"20GiB\"")
            })
    }
}

impl From<MinFree> for String {
    fn from(m: MinFree) -> String {
        match m {
            MinFree::Percent(p) => format!("{p}%"),
            MinFree::Bytes(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    #[serde(with = "humantime_serde")]
    pub unknown_grace: Duration,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub destroy_timeout: Duration,
    pub max_destroy_fraction: f64,
    /// Entries per second across all destroys; 0 = unlimited.
    pub destroy_rate: u64,
    pub min_free: MinFree,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            unknown_grace: d5m(),
            max_in_flight: d4(),
            destroy_timeout: d5m(),
            max_destroy_fraction: dhalf(),
            destroy_rate: 0,
            min_free: d10pct(),
        }
    }
}

/// Logging (not in the design document's example; both keys are optional), the same in
/// both binaries.
pub use protocol::settings::{LogConfig, LogFormat};

fn d2s() -> Duration {
    Duration::from_secs(2)
}
fn d5s() -> Duration {
    Duration::from_secs(5)
}
fn d30s() -> Duration {
    Duration::from_secs(30)
}
fn d1m() -> Duration {
    Duration::from_secs(60)
}
fn d5m() -> Duration {
    Duration::from_secs(300)
}
fn d4() -> usize {
    4
}
fn dhalf() -> f64 {
    0.5
}
fn d10pct() -> MinFree {
    MinFree::Percent(10.0)
}
fn d_root_only() -> Vec<u32> {
    vec![0]
}
fn d1mib() -> u64 {
    1 << 20
}
fn d32mib() -> u64 {
    32 << 20
}
fn d64mib() -> u64 {
    64 << 20
}
fn default_volumes_root() -> PathBuf {
    PathBuf::from("/var/lib/volume-agent/volumes")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/volume-agent/state")
}
fn default_listen() -> Listen {
    Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 7788)))
}
fn default_resource_types_dir() -> PathBuf {
    PathBuf::from("/usr/share/volume-agent/resource-types")
}

/// A configuration that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("environment variable {var}: {message} (correct or unset the variable)")]
    Env { var: String, message: String },
}

impl Config {
    /// Reads `path`, applies `VOLUME_AGENT_*` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path, env)
    }

    /// Parses `text` (named `path` in messages) with overrides from `env`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config: Config =
            protocol::settings::parse(text, ENV_PREFIX, env).map_err(|e| match e {
                protocol::settings::SettingsError::File { message } => invalid(message),
                protocol::settings::SettingsError::Env { var, message } => {
                    ConfigError::Env { var, message }
                }
            })?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.worker_name.trim().is_empty() || self.worker_name == PLACEHOLDER_WORKER {
            return Err(format!(
                "worker_name is {:?}; set it to this worker's unique name",
                self.worker_name
            ));
        }
        if self.worker_name.contains('/') {
            return Err("worker_name must not contain '/'".into());
        }
        let url = self.central.url.as_str();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "central.url {url:?} must start with http:// or https://"
            ));
        }
        if !(0.0..=1.0).contains(&self.gc.max_destroy_fraction) {
            return Err(format!(
                "gc.max_destroy_fraction {} must be between 0 and 1",
                self.gc.max_destroy_fraction
            ));
        }
        if self.gc.max_in_flight == 0 {
            return Err("gc.max_in_flight must be at least 1".into());
        }
        if self.central.poll_interval.is_zero() || self.central.report_interval.is_zero() {
            return Err(
                "central.poll_interval and central.report_interval must be above 0s".into(),
            );
        }
        if self.volumes.scan_interval.is_zero() {
            return Err("volumes.scan_interval must be above 0s (it is how often records are compared with their directories)".into());
        }
        self.validate_api_trust()?;
        self.validate_p2p()
    }

    /// With `p2p.listen` set, `GET /p2p-url` must have a host to answer: `address`,
    /// `interface` (not both), or a listen IP that is not a wildcard.
    fn validate_p2p(&self) -> Result<(), String> {
        let p2p = &self.p2p;
        let Some(listen) = p2p.listen.0 else {
            return Ok(());
        };
        let address = p2p.address.trim();
        let interface = p2p.interface.trim();
        if !address.is_empty() && !interface.is_empty() {
            return Err(
                "p2p.address and p2p.interface are both set; set one of them (the host other workers reach this one at)".into(),
            );
        }
        if address.is_empty() && interface.is_empty() && listen.ip().is_unspecified() {
            return Err(format!(
                "p2p.listen {listen} is a wildcard address, so other workers cannot be told where to reach \
                 this one; set p2p.address (e.g. this worker's IP) or p2p.interface (e.g. \"eth0\")"
            ));
        }
        let host_ok = address.parse::<std::net::IpAddr>().is_ok()
            || (!address.is_empty()
                && address.len() <= 253
                && address.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !address.is_empty() && !host_ok {
            return Err(format!(
                "p2p.address {address:?} is not an IP address or a DNS name; give the host only (no scheme, port or path)"
            ));
        }
        Ok(())
    }

    /// The local API's listen address is loopback or a unix socket unless
    /// `api.allow_remote` says otherwise; import roots are absolute.
    fn validate_api_trust(&self) -> Result<(), String> {
        if let Listen::Tcp(addr) = &self.api.listen {
            if !addr.ip().is_loopback() && !self.api.allow_remote {
                return Err(format!(
                    "api.listen {addr} is not a loopback address: the local API would be reachable \
                     from other machines; listen on 127.0.0.1, ::1 or a unix socket, or set \
                     api.allow_remote = true if that is really wanted"
                ));
            }
        }
        if let Some(root) = self.api.import_roots.iter().find(|r| !r.is_absolute()) {
            return Err(format!(
                "api.import_roots: {} is not an absolute path",
                root.display()
            ));
        }
        Ok(())
    }

    /// Where `import` may read: `api.import_roots`, or the resource types directory.
    pub fn import_roots(&self) -> Vec<PathBuf> {
        if self.api.import_roots.is_empty() {
            vec![self.resource_types.dir.clone()]
        } else {
            self.api.import_roots.clone()
        }
    }

    /// The bearer token, read from `central.token_file` (trimmed), if configured.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.central.token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Some(token.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "worker_name = \"w1\"\n[central]\nurl = \"http://127.0.0.1:8080\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), Vec::new())
    }

    #[test]
    fn defaults_every_key_but_worker_name_and_central_url() {
        let c = parse(MINIMAL).expect("minimal config");
        assert_eq!(c.central.dialect, Dialect::Native);
        assert_eq!(c.central.poll_interval, Duration::from_secs(30));
        assert_eq!(c.volumes.driver, DriverName::Detect);
        assert_eq!(c.volumes.scan_interval, Duration::from_secs(60));
        assert_eq!(
            c.api.listen,
            Listen::Tcp("127.0.0.1:7788".parse().expect("addr"))
        );
        assert_eq!(c.gc.unknown_grace, Duration::from_secs(300));
        assert_eq!(c.gc.max_in_flight, 4);
        assert_eq!(c.gc.min_free, MinFree::Percent(10.0));
        assert_eq!(c.state.cache_bytes, 32 << 20);
    }

    #[test]
    fn parses_the_design_document_example() {
        let text = r#"
worker_name = "worker-0"
[central]
url = "http://127.0.0.1:8080"
dialect = "native"
token_file = "/etc/volume-agent/token"
poll_interval = "30s"
report_interval = "30s"
[volumes]
root = "/var/lib/volume-agent/volumes"
driver = "detect"
scan_interval = "1m"
[state]
dir = "/var/lib/volume-agent/state"
[api]
listen = "127.0.0.1:7788"
[p2p]
listen = ""
address = ""
allowed_networks = []
[resource_types]
dir = "/usr/share/volume-agent/resource-types"
[gc]
unknown_grace = "5m"
max_in_flight = 4
destroy_timeout = "5m"
max_destroy_fraction = 0.5
destroy_rate = 0
min_free = "10%"
"#;
        let c = parse(text).expect("design example parses");
        assert_eq!(c.worker_name, "worker-0");
    }

    #[test]
    fn rejects_a_zero_scan_interval_naming_the_key() {
        let err = parse(&format!("{MINIMAL}[volumes]\nscan_interval = \"0s\"\n"))
            .expect_err("zero scan interval");
        assert!(err.to_string().contains("volumes.scan_interval"), "{err}");
    }

    #[test]
    fn rejects_unknown_key_naming_it() {
        let err = parse(&format!("{MINIMAL}[gc]\nmax_inflight = 3\n")).expect_err("unknown key");
        assert!(err.to_string().contains("max_inflight"), "{err}");
        let err = parse(&format!("colour = 1\n{MINIMAL}")).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn requires_worker_name_and_central_url() {
        let err = parse("[central]\nurl = \"http://x\"\n").expect_err("no worker");
        assert!(err.to_string().contains("worker_name"), "{err}");
        let err = parse("worker_name = \"w\"\n[central]\n").expect_err("no url");
        assert!(err.to_string().contains("url"), "{err}");
    }

    #[test]
    fn refuses_the_placeholder_worker_name() {
        let err = parse("worker_name = \"CHANGE-ME\"\n[central]\nurl = \"http://x\"\n")
            .expect_err("placeholder");
        assert!(err.to_string().contains("unique name"), "{err}");
    }

    #[test]
    fn rejects_bad_duration_naming_the_key() {
        let err = parse(&format!("{MINIMAL}poll_interval = \"soon\"\n")).expect_err("bad");
        assert!(err.to_string().contains("poll_interval"), "{err}");
    }

    #[test]
    fn environment_overrides_keys() {
        let env = vec![
            ("VOLUME_AGENT_WORKER_NAME".to_string(), "w9".to_string()),
            (
                "VOLUME_AGENT_CENTRAL__POLL_INTERVAL".to_string(),
                "10s".to_string(),
            ),
            (
                "VOLUME_AGENT_GC__MAX_IN_FLIGHT".to_string(),
                "8".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::parse(MINIMAL, Path::new("t"), env).expect("overrides apply");
        assert_eq!(c.worker_name, "w9");
        assert_eq!(c.central.poll_interval, Duration::from_secs(10));
        assert_eq!(c.gc.max_in_flight, 8);
    }

    #[test]
    fn an_error_in_an_environment_override_names_the_variable_not_the_file() {
        let env = vec![("VOLUME_AGENT_GC__NOPE".to_string(), "1".to_string())];
        let err = Config::parse(MINIMAL, Path::new("t.toml"), env).expect_err("unknown key");
        let text = err.to_string();
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "VOLUME_AGENT_GC__NOPE"),
            "{text}"
        );
        assert!(text.contains("nope") && !text.contains("t.toml"), "{text}");
        let env = vec![(
            "VOLUME_AGENT_GC__MAX_IN_FLIGHT".to_string(),
            "many".to_string(),
        )];
        let err = Config::parse(MINIMAL, Path::new("t.toml"), env).expect_err("bad value");
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "VOLUME_AGENT_GC__MAX_IN_FLIGHT"),
            "{err}"
        );
        assert!(err.to_string().contains("gc.max_in_flight"), "{err}");
        let env = vec![("VOLUME_AGENT_NOPE".to_string(), "1".to_string())];
        let err = Config::parse(MINIMAL, Path::new("t.toml"), env).expect_err("top level");
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "VOLUME_AGENT_NOPE"),
            "{err}"
        );
        // A mistake in the file itself is still the file's.
        let err = parse(&format!("{MINIMAL}[gc]\nnope = 1\n")).expect_err("file");
        assert!(matches!(&err, ConfigError::Invalid { .. }), "{err}");
    }

    #[test]
    fn api_listen_takes_an_address_or_a_unix_socket() {
        let c = parse(&format!(
            "{MINIMAL}[api]\nlisten = \"unix:/run/volume-agent/api.sock\"\n"
        ))
        .expect("unix socket");
        assert_eq!(
            c.api.listen,
            Listen::Unix(PathBuf::from("/run/volume-agent/api.sock"))
        );
        assert_eq!(c.api.listen.api_base(), "unix:/run/volume-agent/api.sock");
        let c = parse(&format!("{MINIMAL}[api]\nlisten = \"[::1]:9000\"\n")).expect("ipv6");
        assert_eq!(c.api.listen.api_base(), "http://[::1]:9000");
        let env = vec![(
            "VOLUME_AGENT_API__LISTEN".to_string(),
            "unix:/tmp/a.sock".to_string(),
        )];
        let c = Config::parse(MINIMAL, Path::new("t"), env).expect("override");
        assert_eq!(c.api.listen, Listen::Unix(PathBuf::from("/tmp/a.sock")));
        // The effective configuration `config check` prints parses again.
        let again = parse(&toml::to_string_pretty(&c).expect("encodes")).expect("round trip");
        assert_eq!(again.api.listen, c.api.listen);
        for bad in ["unix:api.sock", "localhost", "127.0.0.1"] {
            let err = parse(&format!("{MINIMAL}[api]\nlisten = \"{bad}\"\n")).expect_err(bad);
            assert!(err.to_string().contains("api.listen"), "{err}");
        }
    }

    #[test]
    fn refuses_a_non_loopback_listen_address_unless_allow_remote() {
        let err =
            parse(&format!("{MINIMAL}[api]\nlisten = \"0.0.0.0:7788\"\n")).expect_err("remote");
        assert!(err.to_string().contains("api.allow_remote"), "{err}");
        assert!(err.to_string().contains("0.0.0.0:7788"), "{err}");
        let c = parse(&format!(
            "{MINIMAL}[api]\nlisten = \"0.0.0.0:7788\"\nallow_remote = true\n"
        ))
        .expect("allowed");
        assert!(c.api.allow_remote);
        for ok in ["127.0.0.2:1", "[::1]:1", "unix:/run/a.sock"] {
            parse(&format!("{MINIMAL}[api]\nlisten = \"{ok}\"\n")).expect(ok);
        }
    }

    #[test]
    fn local_api_trust_defaults_and_import_roots() {
        let c = parse(MINIMAL).expect("minimal");
        assert_eq!(c.api.allowed_uids, vec![0]);
        assert!(c.api.allowed_groups.is_empty());
        assert_eq!(c.import_roots(), vec![c.resource_types.dir.clone()]);
        let c = parse(&format!(
            "{MINIMAL}[api]\nimport_roots = [\"/srv/images\"]\n"
        ))
        .expect("roots");
        assert_eq!(c.import_roots(), vec![PathBuf::from("/srv/images")]);
        let err =
            parse(&format!("{MINIMAL}[api]\nimport_roots = [\"images\"]\n")).expect_err("relative");
        assert!(err.to_string().contains("api.import_roots"), "{err}");
    }

    #[test]
    fn min_free_in_bytes_is_what_pressure_compares_against() {
        assert_eq!(MinFree::Percent(10.0).bytes_of(1000), 100);
        assert_eq!(MinFree::Bytes(7).bytes_of(1000), 7);
        assert!(MinFree::Percent(10.0).is_below(99, 1000));
        assert!(!MinFree::Percent(10.0).is_below(100, 1000));
    }

    #[test]
    fn min_free_accepts_percent_and_sizes() {
        assert_eq!(
            MinFree::try_from("10%".to_string()),
            Ok(MinFree::Percent(10.0))
        );
        assert_eq!(
            MinFree::try_from("2GiB".to_string()),
            Ok(MinFree::Bytes(2 << 30))
        );
        assert!(MinFree::try_from("lots".to_string()).is_err());
        assert!(MinFree::Percent(10.0).is_below(5, 100));
        assert!(!MinFree::Percent(10.0).is_below(50, 100));
    }

    #[test]
    fn p2p_is_off_unless_listen_is_set() {
        let c = parse(MINIMAL).expect("minimal");
        assert_eq!(c.p2p.listen, ListenOrOff(None));
        let c = parse(&format!(
            "{MINIMAL}[p2p]\nlisten = \"0.0.0.0:7789\"\naddress = \"10.1.2.3\"\nallowed_networks = [\"10.0.0.0/8\", \"fd00::/8\"]\n"
        ))
        .expect("p2p");
        assert_eq!(c.p2p.listen.0, Some("0.0.0.0:7789".parse().expect("addr")));
        assert_eq!(c.p2p.allowed_networks.len(), 2);
    }

    #[test]
    fn p2p_needs_a_host_to_announce_and_names_the_keys() {
        let err = parse(&format!("{MINIMAL}[p2p]\nlisten = \"0.0.0.0:7789\"\n"))
            .expect_err("wildcard without address");
        assert!(err.to_string().contains("p2p.address"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}[p2p]\nlisten = \"10.0.0.1:7789\"\naddress = \"a\"\ninterface = \"eth0\"\n"
        ))
        .expect_err("both");
        assert!(err.to_string().contains("p2p.interface"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}[p2p]\nlisten = \"10.0.0.1:7789\"\naddress = \"http://w1:7789\"\n"
        ))
        .expect_err("a URL is not a host");
        assert!(err.to_string().contains("host only"), "{err}");
        let err = parse(&format!("{MINIMAL}[p2p]\nlisten = \"eth0\"\n")).expect_err("bad listen");
        assert!(err.to_string().contains("p2p.listen"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}[p2p]\nlisten = \"10.0.0.1:7789\"\nallowed_networks = [\"10.0.0.0/33\"]\n"
        ))
        .expect_err("bad network");
        assert!(err.to_string().contains("p2p.allowed_networks"), "{err}");
        // A specific listen IP is the host announced.
        parse(&format!("{MINIMAL}[p2p]\nlisten = \"127.0.0.2:0\"\n")).expect("specific ip");
    }

    #[test]
    fn an_empty_section_and_an_omitted_one_take_the_one_written_default() {
        let omitted = parse(MINIMAL).expect("minimal");
        let empty = parse(&format!(
            "{MINIMAL}[volumes]\n[state]\n[api]\n[p2p]\n[metrics]\n[resource_types]\n[gc]\n[log]\n"
        ))
        .expect("empty sections");
        assert_eq!(omitted, empty);
        assert_eq!(omitted.volumes, VolumesConfig::default());
        assert_eq!(omitted.state, StateConfig::default());
        assert_eq!(omitted.api, ApiConfig::default());
        assert_eq!(omitted.p2p, P2pConfig::default());
        assert_eq!(omitted.metrics, MetricsConfig::default());
        assert_eq!(omitted.resource_types, ResourceTypesConfig::default());
        assert_eq!(omitted.gc, GcConfig::default());
        assert_eq!(omitted.log, LogConfig::default());
    }

    #[test]
    fn metrics_listener_is_off_unless_listen_is_set() {
        assert_eq!(
            parse(MINIMAL).expect("minimal").metrics.listen,
            ListenOrOff(None)
        );
        let c = parse(&format!("{MINIMAL}[metrics]\nlisten = \"0.0.0.0:9788\"\n")).expect("on");
        assert_eq!(
            c.metrics.listen.0,
            Some("0.0.0.0:9788".parse().expect("addr"))
        );
        let err = parse(&format!("{MINIMAL}[metrics]\nlisten = \"9788\"\n")).expect_err("no ip");
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }
}
