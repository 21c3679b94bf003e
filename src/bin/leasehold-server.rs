//! `leasehold-server`: the lock server as a command.

use clap::Parser;

// The duration syntax (`250ms`, `10s`, `5m`, `1h`) is the command-line client's.
#[allow(dead_code)]
#[path = "leasehold/duration.rs"]
mod duration;
use leasehold::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The leasehold lock server: clients of any number of processes and machines take turns on
/// named locks, with leases, fencing tokens and FIFO waiting. Locks are kept in memory, or in
/// etcd so that several servers share them.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
    leasehold-server                                   # open development mode on 127.0.0.1:7878\n  \
    leasehold-server --listen 0.0.0.0:7878 --key-file keys.toml \\\n      \
    --tls-cert cert.pem --tls-key key.pem --state-file /var/lib/leasehold/state\n  \
    leasehold-server --backend etcd --etcd-endpoints https://etcd1:2379,https://etcd2:2379 \\\n      \
    --etcd-ca-file etcd-ca.pem --etcd-cert-file client.pem --etcd-key-file client-key.pem\n  \
    leasehold-server new-key --project billing         # print a new API key and its key-file line\n\n\
    Every option can also be set by the environment variable shown with it."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create an API key for a project: prints the key once, and the line to add to the
    /// project's `keys` in the key file (which stores only its SHA-256 digest).
    NewKey {
        /// The project the key is for.
        #[arg(long)]
        project: String,
    },
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "LEASEHOLD_LISTEN", default_value = "127.0.0.1:7878")]
    listen: String,

    /// Serve /metrics (and /healthz) on this address of its own, in plain HTTP, such as a
    /// private interface; the main address then answers /metrics with 404. Without it,
    /// /metrics is on the main address, needs no API key, and shows every project's
    /// activity counts: firewall it or move it here.
    #[arg(long, env = "LEASEHOLD_METRICS_LISTEN")]
    metrics_listen: Option<String>,

    /// Projects and API keys (TOML). Without it: open development mode, any key accepted.
    /// Re-read when it changes (once it has stopped changing), and on SIGHUP. Replace it
    /// atomically (write a new file, then rename it over this one): a version that does
    /// not parse, or has no keys while the one in use has some, is refused with a warning
    /// and the keys in use stay.
    #[arg(long, env = "LEASEHOLD_KEY_FILE")]
    key_file: Option<PathBuf>,

    /// How often to check the key file for changes (0: only on SIGHUP).
    #[arg(long, env = "LEASEHOLD_KEY_CHECK_INTERVAL", default_value = "1s", value_parser = duration::parse)]
    key_check_interval: Duration,

    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "LEASEHOLD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "LEASEHOLD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// File keeping restart state (token floor, longest lease); grants wait out old leases
    /// after a crash. [default: $STATE_DIRECTORY/leasehold.state under systemd, else
    /// $XDG_STATE_HOME/leasehold/leasehold.state, else
    /// ~/.local/state/leasehold/leasehold.state]
    #[arg(long, env = "LEASEHOLD_STATE_FILE")]
    state_file: Option<PathBuf>,

    /// After a crash, grant no lock for at most this long (leases up to this long may still
    /// run). A longer lease is recorded with its lock in the state file, and after a crash
    /// only that lock waits for it.
    #[arg(long, env = "LEASEHOLD_CRASH_HOLD_BACK", default_value = "30s", value_parser = duration::parse)]
    crash_hold_back: Duration,

    /// Keep no restart state (development only: a restart may then grant a lock a client
    /// still believes it holds).
    #[arg(long)]
    no_state_file: bool,

    /// Where locks are kept: `memory` (this process only) or `etcd` (shared by every server
    /// over the same etcd cluster; needs the crate's `etcd` feature).
    #[arg(long, env = "LEASEHOLD_BACKEND", value_enum, default_value_t = Backend::Memory)]
    backend: Backend,

    /// etcd client URLs for `--backend etcd`, comma-separated.
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,

    /// Key prefix in etcd: servers with the same prefix share their locks.
    #[arg(long, env = "LEASEHOLD_ETCD_PREFIX", default_value = "/leasehold")]
    etcd_prefix: String,

    /// PEM CA certificate(s) to trust for etcd's certificate (https:// endpoints), instead
    /// of Mozilla's roots.
    #[arg(long, env = "LEASEHOLD_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,

    /// PEM client certificate for etcd's mutual TLS (with --etcd-key-file).
    #[arg(long, env = "LEASEHOLD_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,

    /// PEM private key for --etcd-cert-file.
    #[arg(long, env = "LEASEHOLD_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,

    /// etcd user to log in as (etcd authentication). Its password comes from
    /// --etcd-password-file or the environment variable LEASEHOLD_ETCD_PASSWORD.
    #[arg(long, env = "LEASEHOLD_ETCD_USER")]
    etcd_user: Option<String>,

    /// File holding the password of --etcd-user (one line).
    #[arg(long, env = "LEASEHOLD_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,

    /// Longest lease a client may ask for, such as `1h` or `90s` (at most 24h).
    #[arg(long, env = "LEASEHOLD_MAX_LEASE", default_value = "1h", value_parser = duration::parse)]
    max_lease: Duration,

    /// Longest lock-delay (`lock_delay_ms`) an acquire may ask for; longer ones are refused
    /// with 400 (at most 24h; 0 refuses every lock-delay).
    #[arg(long, env = "LEASEHOLD_MAX_LOCK_DELAY", default_value = "60s", value_parser = duration::parse)]
    max_lock_delay: Duration,

    /// Longest time one long poll is held open.
    #[arg(long, env = "LEASEHOLD_MAX_POLL", default_value = "20s", value_parser = duration::parse)]
    max_poll: Duration,

    /// Most waiters one lock may have.
    #[arg(long, env = "LEASEHOLD_MAX_WAITERS", default_value_t = 100_000)]
    max_waiters_per_lock: usize,

    /// Largest request body in bytes.
    #[arg(long, env = "LEASEHOLD_MAX_BODY", default_value_t = 1 << 20)]
    max_body_bytes: usize,

    /// Most bytes of request bodies held in memory at once while they are read; each project
    /// may use a quarter. Bodies beyond it are refused with 503 and Retry-After.
    #[arg(long, env = "LEASEHOLD_BODY_BUDGET", default_value_t = 256 << 20)]
    body_budget: usize,

    /// Most locks, held or waited for, one project may have at once where the key file sets
    /// no max_locks (open mode too); 429 beyond.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_LOCKS_PER_PROJECT",
        default_value_t = 1_000_000
    )]
    max_locks_per_project: u64,

    /// Most acquire requests of one project in flight at once; every waiter is one (open
    /// mode too); 429 beyond.
    #[arg(
        long,
        env = "LEASEHOLD_MAX_ACQUIRES_PER_PROJECT",
        default_value_t = 20_000
    )]
    max_acquires_per_project: usize,

    /// Most open client connections.
    #[arg(long, env = "LEASEHOLD_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Most open connections from one source address (an IPv6 address counts by its /64),
    /// so that one client cannot take them all. 0: no per-address cap (behind a proxy or
    /// load balancer that connects from one address).
    #[arg(long, env = "LEASEHOLD_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: usize,

    /// Close a connection whose client takes none of its responses for this long (it
    /// stopped reading, or keeps its HTTP/2 flow-control window at zero).
    #[arg(long, env = "LEASEHOLD_WRITE_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    write_timeout: Duration,

    /// Time a client has to send a request header (slowloris protection); a new
    /// connection's first one is due this long after accept, TLS handshake included.
    #[arg(long, env = "LEASEHOLD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    header_read_timeout: Duration,

    /// Close connections with no request in flight for this long.
    #[arg(long, env = "LEASEHOLD_IDLE_TIMEOUT", default_value = "60s", value_parser = duration::parse)]
    idle_timeout: Duration,

    /// How long a shutdown waits for requests in progress, and how long a connection asked
    /// to close (HTTP/2 GOAWAY after the idle timeout) may take to finish before it is cut.
    #[arg(long, env = "LEASEHOLD_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    drain_timeout: Duration,

    /// Time a client has to complete the TLS handshake.
    #[arg(long, env = "LEASEHOLD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    handshake_timeout: Duration,

    /// Append an audit trail of every grant, renewal, release and expiry to this file
    /// (JSON lines).
    #[arg(long, env = "LEASEHOLD_EVENT_LOG")]
    event_log: Option<PathBuf>,

    /// Worker threads (default: one per core).
    #[arg(long, env = "LEASEHOLD_THREADS")]
    threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// Locks live in this process (with a restart state file).
    Memory,
    /// Locks live in etcd, shared by every server with the same etcd and prefix.
    Etcd,
}

/// Libraries whose log lines a client can provoke (the h2 crate logs a warning for every
/// unsolicited PING acknowledgement): at `error` unless RUST_LOG names them.
const QUIET_TARGETS: [&str; 7] = [
    "h2",
    "h2::proto",
    "hyper",
    "hyper_util",
    "rustls",
    "tonic",
    "tower",
];

/// The log filter: RUST_LOG (default `info`), plus `error` for each of [`QUIET_TARGETS`]
/// that RUST_LOG does not name (itself or a parent module).
fn log_filter(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    let named: Vec<&str> = base
        .split(',')
        .filter_map(|directive| directive.split(['=', '[']).next())
        .map(str::trim)
        .filter(|target| !target.is_empty())
        .collect();
    let mut filter = base.to_owned();
    for target in QUIET_TARGETS {
        let mentioned = named.iter().any(|n| {
            target == *n
                || target
                    .strip_prefix(n)
                    .is_some_and(|rest| rest.starts_with("::"))
        });
        if !mentioned {
            filter.push_str(&format!(",{target}=error"));
        }
    }
    filter
}

fn main() -> ExitCode {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(None)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::NewKey { project }) = cli.command {
        let (key, line) = leasehold::server::new_key(&project);
        println!(
            "New API key for project {project:?}. It is shown only this once: store it now.\n"
        );
        println!("    {key}\n");
        println!("Add this line to the `keys` of project {project:?} in the key file:\n");
        println!("    {line}");
        return ExitCode::SUCCESS;
    }
    let args = cli.serve;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), leasehold::Error> {
    let mut signals = Signals::install();
    let mut builder = Server::builder()
        .bind(&args.listen)
        .max_connections_per_ip(args.max_connections_per_ip)
        .write_timeout(args.write_timeout)
        .drain_timeout(args.drain_timeout)
        .max_lease(args.max_lease)
        .max_lock_delay(args.max_lock_delay)
        .max_poll(args.max_poll)
        .max_waiters_per_lock(args.max_waiters_per_lock)
        .max_body_bytes(args.max_body_bytes)
        .body_budget(args.body_budget)
        .max_locks_per_project(args.max_locks_per_project)
        .max_acquires_per_project(args.max_acquires_per_project)
        .max_connections(args.max_connections)
        .header_read_timeout(args.header_read_timeout)
        .idle_timeout(args.idle_timeout)
        .handshake_timeout(args.handshake_timeout);
    if let Some(addr) = &args.metrics_listen {
        builder = builder.metrics_bind(addr);
    }
    if let Some(path) = &args.event_log {
        builder = builder.event_log(path);
    }
    if let Some(path) = &args.key_file {
        builder = builder
            .key_file(path)
            .key_reload_interval(args.key_check_interval);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls(cert, key);
    }
    match args.backend {
        Backend::Etcd => builder = etcd_backend(builder, &args)?,
        Backend::Memory if args.no_state_file => tracing::warn!(
            "no state file: after a restart, locks may be granted that clients still believe they hold"
        ),
        Backend::Memory => {
            builder = builder
                .state_file(state_file(&args)?)
                .crash_hold_back(args.crash_hold_back)
        }
    }
    let server = builder.start().await?;
    if server.is_open_mode() {
        tracing::warn!(
            "OPEN DEVELOPMENT MODE: no key file is configured, so any API key is accepted and each distinct key is its own project. Use --key-file in production."
        );
    }
    if let Some(addr) = server.metrics_addr() {
        tracing::info!("serving /metrics on http://{addr}/metrics");
    }
    tracing::info!("listening on {}", server.url());
    while let Signal::Reload = signals.next().await {
        match server.reload_keys() {
            Ok(keys) => tracing::info!(keys, "SIGHUP: key file reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: key file refused; keeping the keys in use")
            }
        }
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// The state file: `--state-file`, else the state directory's (created if missing). Never
/// the current directory by accident.
fn state_file(args: &Args) -> Result<PathBuf, leasehold::Error> {
    if let Some(path) = &args.state_file {
        return Ok(path.clone());
    }
    let path = leasehold::server::default_state_file().ok_or_else(|| {
        leasehold::Error::InvalidArgument {
            message: "no state directory: neither STATE_DIRECTORY, XDG_STATE_HOME nor HOME is \
                      set to an absolute path; name the state file with --state-file PATH \
                      (or LEASEHOLD_STATE_FILE)"
                .into(),
        }
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| leasehold::Error::Io {
            context: format!(
                "cannot create the state directory {} (name another file with --state-file)",
                dir.display()
            ),
            source,
        })?;
    }
    tracing::info!(path = %path.display(), "state file");
    Ok(path)
}

/// Where the etcd password may come from besides --etcd-password-file. Not a flag: command
/// lines are visible to every user of the machine.
#[cfg(feature = "etcd")]
const ETCD_PASSWORD_ENV: &str = "LEASEHOLD_ETCD_PASSWORD";

#[cfg(feature = "etcd")]
fn etcd_backend(
    mut builder: leasehold::server::ServerBuilder,
    args: &Args,
) -> Result<leasehold::server::ServerBuilder, leasehold::Error> {
    let endpoints: Vec<String> = args
        .etcd_endpoints
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    tracing::info!(
        endpoints = %endpoints.join(","),
        prefix = %args.etcd_prefix,
        ca_file = ?args.etcd_ca_file,
        client_cert = ?args.etcd_cert_file,
        user = ?args.etcd_user,
        "etcd backend: locks are shared by every server over this etcd cluster and prefix"
    );
    builder = builder.etcd(endpoints).etcd_prefix(&args.etcd_prefix);
    if let Some(path) = &args.etcd_ca_file {
        builder = builder.etcd_ca_file(path);
    }
    if let (Some(cert), Some(key)) = (&args.etcd_cert_file, &args.etcd_key_file) {
        builder = builder.etcd_client_cert(cert, key);
    }
    if let Some(user) = &args.etcd_user {
        builder = builder.etcd_user(user, etcd_password(args)?);
    }
    Ok(builder)
}

/// The password of --etcd-user, from exactly one of its two sources.
#[cfg(feature = "etcd")]
fn etcd_password(args: &Args) -> Result<String, leasehold::Error> {
    let invalid = |message: String| leasehold::Error::InvalidArgument { message };
    let from_env = std::env::var_os(ETCD_PASSWORD_ENV);
    let password = match (&args.etcd_password_file, from_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "the etcd password is given twice: use --etcd-password-file or \
                 {ETCD_PASSWORD_ENV}, not both"
            )));
        }
        (None, None) => {
            return Err(invalid(format!(
                "--etcd-user needs a password: --etcd-password-file PATH or {ETCD_PASSWORD_ENV}"
            )));
        }
        (None, Some(value)) => value
            .into_string()
            .map_err(|_| invalid(format!("{ETCD_PASSWORD_ENV} is not valid UTF-8")))?,
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|source| leasehold::Error::Io {
                context: format!("cannot read --etcd-password-file {}", path.display()),
                source,
            })?;
            // Files written by editors and `echo` end with a line break; the password
            // does not.
            text.trim_end_matches(['\n', '\r']).to_owned()
        }
    };
    if password.is_empty() {
        return Err(invalid("the etcd password is empty".into()));
    }
    Ok(password)
}

#[cfg(not(feature = "etcd"))]
fn etcd_backend(
    _: leasehold::server::ServerBuilder,
    _: &Args,
) -> Result<leasehold::server::ServerBuilder, leasehold::Error> {
    Err(leasehold::Error::InvalidArgument {
        message: "--backend etcd: this build has no etcd backend; build the server with the \
                  `etcd` cargo feature (cargo install leasehold --features etcd)"
            .into(),
    })
}

enum Signal {
    Reload,
    Stop,
}

/// The signals the server acts on, listened for from the start: a SIGHUP, SIGTERM or SIGINT that
/// arrived before its handler was installed would end the process at once (their default
/// action), without the clean shutdown that spares the next start its hold-back.
struct Signals {
    #[cfg(unix)]
    streams: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    /// Installs the handlers; call on the runtime, before anything is announced.
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(term), Ok(int), Ok(hup)) => Some([term, int, hup]),
                _ => None,
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some([term, int, hup]) = &mut self.streams {
            return tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn libraries_are_quiet_unless_rust_log_names_them() {
        assert_eq!(
            log_filter(None),
            "info,h2=error,h2::proto=error,hyper=error,hyper_util=error,rustls=error,\
             tonic=error,tower=error"
        );
        let filter = log_filter(Some("debug,h2=trace,leasehold=info"));
        assert!(
            filter.starts_with("debug,h2=trace,leasehold=info,"),
            "{filter}"
        );
        assert!(!filter.contains("h2=error") && !filter.contains("h2::proto=error"));
        assert!(filter.contains("hyper=error") && filter.contains("hyper_util=error"));
        let filter = log_filter(Some("h2::proto=debug"));
        assert!(filter.contains(",h2=error") && !filter.contains("h2::proto=error"));
        assert!(log_filter(Some("  ")).starts_with("info,"));
    }
}
