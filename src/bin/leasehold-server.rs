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

/// A lock server for leasehold clients.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
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

    /// Projects and API keys (TOML). Without it: open development mode, any key accepted.
    /// Re-read when it changes, and on SIGHUP.
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
    /// after a crash.
    #[arg(long, env = "LEASEHOLD_STATE_FILE", default_value = "leasehold.state")]
    state_file: PathBuf,

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

    /// Longest time one long poll is held open.
    #[arg(long, env = "LEASEHOLD_MAX_POLL", default_value = "20s", value_parser = duration::parse)]
    max_poll: Duration,

    /// Most waiters one lock may have.
    #[arg(long, env = "LEASEHOLD_MAX_WAITERS", default_value_t = 100_000)]
    max_waiters_per_lock: usize,

    /// Largest request body in bytes.
    #[arg(long, env = "LEASEHOLD_MAX_BODY", default_value_t = 1 << 20)]
    max_body_bytes: usize,

    /// Most open client connections.
    #[arg(long, env = "LEASEHOLD_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,

    /// Time a client has to send a request header (slowloris protection).
    #[arg(long, env = "LEASEHOLD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    header_read_timeout: Duration,

    /// Close connections with no request in flight for this long.
    #[arg(long, env = "LEASEHOLD_IDLE_TIMEOUT", default_value = "60s", value_parser = duration::parse)]
    idle_timeout: Duration,

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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
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
    let mut builder = Server::builder()
        .bind(&args.listen)
        .max_lease(args.max_lease)
        .max_poll(args.max_poll)
        .max_waiters_per_lock(args.max_waiters_per_lock)
        .max_body_bytes(args.max_body_bytes)
        .max_connections(args.max_connections)
        .header_read_timeout(args.header_read_timeout)
        .idle_timeout(args.idle_timeout)
        .handshake_timeout(args.handshake_timeout);
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
                .state_file(&args.state_file)
                .crash_hold_back(args.crash_hold_back)
        }
    }
    let server = builder.start().await?;
    if server.is_open_mode() {
        tracing::warn!(
            "OPEN DEVELOPMENT MODE: no key file is configured, so any API key is accepted and each distinct key is its own project. Use --key-file in production."
        );
    }
    tracing::info!("listening on {}", server.url());
    while let Signal::Reload = next_signal().await {
        match server.reload_keys() {
            Ok(keys) => tracing::info!(keys, "SIGHUP: key file reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: key file invalid; keeping the keys in use")
            }
        }
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
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

#[cfg(not(unix))]
async fn next_signal() -> Signal {
    let _ = tokio::signal::ctrl_c().await;
    Signal::Stop
}

#[cfg(unix)]
async fn next_signal() -> Signal {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return Signal::Stop;
    };
    tokio::select! {
        _ = term.recv() => Signal::Stop,
        _ = tokio::signal::ctrl_c() => Signal::Stop,
        _ = hup.recv() => Signal::Reload,
    }
}
