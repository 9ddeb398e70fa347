use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imagegate::config::Config;
use imagegate::server::{self, AppState};

#[derive(Parser)]
#[command(
    name = "imagegate",
    version,
    about = "An OpenAI-compatible gateway for image generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file; relative paths inside it resolve against the working directory.
        #[arg(long, short, default_value = "gateway.yaml", env = "IMAGEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and exit non-zero with every error found.
    Check {
        #[arg(long, short, default_value = "gateway.yaml", env = "IMAGEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Print the secret_sha256 of a key secret read from standard input.
    HashKey,
    /// GET a plain-HTTP URL and exit 0 on a 2xx answer (container health checks, where the
    /// image has no curl).
    Probe {
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

/// A minimal HTTP/1.1 GET for `imagegate probe`.
fn probe(url: &str) -> Result<(), String> {
    use std::io::Write;
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    if parsed.scheme() != "http" {
        return Err("only http:// URLs can be probed".into());
    }
    let host = parsed.host_str().ok_or("no host")?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let timeout = std::time::Duration::from_secs(3);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("cannot resolve the host")?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut head).map_err(|e| e.to_string())?;
    match &head[9..10] {
        b"2" => Ok(()),
        _ => Err(format!(
            "answered {}",
            String::from_utf8_lossy(&head[9..12])
        )),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: invalid configuration:", path.display());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(2)
    })
}

/// Large buffers (upstream answers of tens of MB) come from mmap and go back to the OS when
/// freed. glibc otherwise raises its mmap threshold after the first such free and keeps later
/// ones on the heap, so RSS stays at its peak long after the traffic that caused it.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} backends, {} models, {} tenants, {} keys)",
                    config.display(),
                    c.backends.len(),
                    c.models.len(),
                    c.tenants.len(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::HashKey => {
            let mut secret = String::new();
            if std::io::stdin().read_to_string(&mut secret).is_err() {
                eprintln!("cannot read the secret from standard input");
                return ExitCode::FAILURE;
            }
            println!(
                "{}",
                hex::encode(imagegate::auth::hash_secret(secret.trim()))
            );
            ExitCode::SUCCESS
        }
        Command::Probe { url } => match probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("probe {url}: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let path = config;
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("imagegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let telemetry = imagegate::telemetry::init(&config.log);
    for id in imagegate::auth::StaticKeyStore::plaintext_key_ids(&config) {
        tracing::warn!(
            key_id = id,
            "key has a plaintext `secret` in the config; use `secret_sha256` outside local demos"
        );
    }
    let listen = config.listen;
    let admin = match config.admin.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (admin): {e}"))?,
        ),
        None => None,
    };
    let state = AppState::build_from(config, Some(path)).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "imagegate listening");
    let admin = admin.map(|l| {
        tracing::info!(address = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listener (/metrics)");
        tokio::spawn(server::serve_admin(state.clone(), l))
    });
    server::serve(state, listener, server::shutdown_signal()).await?;
    if let Some(a) = admin {
        a.abort();
    }
    // Flush spans still waiting for export.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}
