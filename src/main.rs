use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imagegate::config::Config;
use imagegate::server::{self, AppState};

#[path = "cli/batches.rs"]
mod cli_batches;

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
    /// The models a config serves (rules, operations, prices, lifecycle) or, with --catalog,
    /// the whole model catalog; warns about routes to upstream models that are shut down.
    Models {
        #[arg(long, short, default_value = "gateway.yaml", env = "IMAGEGATE_CONFIG")]
        config: PathBuf,
        /// Every catalog entry (built in, plus the config's `catalog:` files), snapshots too.
        #[arg(long)]
        catalog: bool,
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the secret_sha256 of a key secret read from standard input.
    HashKey,
    /// Tenants in the configured store (SQLite or PostgreSQL).
    Tenants {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Batches in the configured store: list a tenant's, show one, cancel one.
    Batches {
        #[command(subcommand)]
        command: cli_batches::BatchCommand,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// API keys in the configured store.
    Keys {
        #[command(subcommand)]
        command: KeyCommand,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// The usage ledger: rows, or totals per day/model/key/tenant, as JSON or CSV.
    Usage {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (inclusive).
        #[arg(long)]
        from: Option<String>,
        /// As --from (exclusive).
        #[arg(long)]
        to: Option<String>,
        /// day, model, key or tenant.
        #[arg(long)]
        group_by: Option<String>,
        /// json or csv.
        #[arg(long, default_value = "json")]
        format: String,
        /// Most rows listed (without --group-by).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        store: StoreConfig,
    },
    /// GET a plain-HTTP URL and exit 0 on a 2xx answer (container health checks, where the
    /// image has no curl).
    Probe {
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

/// The config file whose `state` names the store the store commands work on.
#[derive(clap::Args)]
struct StoreConfig {
    #[arg(
        long,
        short,
        global = true,
        default_value = "gateway.yaml",
        env = "IMAGEGATE_CONFIG"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant.
    Add {
        id: String,
        /// Models it may use (comma-separated; `*` for all).
        #[arg(long, default_value = "*", value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Images per minute.
        #[arg(long)]
        ipm: Option<u32>,
        /// Requests in flight at once.
        #[arg(long)]
        concurrent: Option<u32>,
        /// Budget in micro-dollars per `--budget-period`.
        #[arg(long)]
        budget_micro_usd: Option<u64>,
        /// daily, monthly or total.
        #[arg(long, default_value = "monthly")]
        budget_period: String,
        /// Labels, `key=value`.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List tenants (JSON lines).
    List,
    /// Disable a tenant: every key of it stops working.
    Disable { id: String },
    /// Enable a disabled tenant.
    Enable { id: String },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Narrow the tenant's models (comma-separated).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Expire after this long (`30d`, `12h`).
        #[arg(long)]
        expires_in: Option<String>,
        /// Let the key manage its tenant's keys in the tenant portal.
        #[arg(long)]
        manage_keys: bool,
    },
    /// List keys (JSON lines; never secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key for good.
    Revoke { id: String },
    /// Issue a new secret; the old one keeps working for `--grace`.
    Rotate {
        id: String,
        #[arg(long, default_value = "0s")]
        grace: String,
    },
}

async fn store_command(
    config: &std::path::Path,
    run: impl AsyncFnOnce(imagegate::store::Database) -> Result<(), String>,
) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let db = match imagegate::server::open_store(&config).await {
        Ok(Some(db)) => db,
        Ok(None) => {
            eprintln!("state.store is none: there is no key store to work on");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(db).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

async fn tenants(db: imagegate::store::Database, command: TenantCommand) -> Result<(), String> {
    use imagegate::store::keys::TenantInput;
    let e = |e: imagegate::store::StoreError| e.to_string();
    match command {
        TenantCommand::Add {
            id,
            models,
            rpm,
            ipm,
            concurrent,
            budget_micro_usd,
            budget_period,
            labels,
        } => {
            let period: imagegate::config::BudgetPeriod = serde_json::from_value(
                serde_json::Value::String(budget_period.clone()),
            )
            .map_err(|_| format!("--budget-period {budget_period}: daily, monthly or total"))?;
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| format!("label \"{l}\" is not key=value"))
                })
                .collect::<Result<_, _>>()?;
            let input = TenantInput {
                id,
                models,
                limits: imagegate::config::LimitsConfig {
                    requests_per_minute: rpm,
                    images_per_minute: ipm,
                    burst: None,
                    concurrent_requests: concurrent,
                    budget: budget_micro_usd
                        .map(|micro_usd| imagegate::config::BudgetConfig { micro_usd, period }),
                    batch: None,
                },
                labels,
                ..TenantInput::default()
            };
            print_json(&db.create_tenant(&input).await.map_err(e)?);
        }
        TenantCommand::List => {
            let mut after: Option<String> = None;
            loop {
                let page = db
                    .list_tenants(None, after.as_deref(), 500)
                    .await
                    .map_err(e)?;
                for t in &page {
                    print_json(t);
                }
                match page.last() {
                    Some(t) if page.len() == 500 => after = Some(t.id.clone()),
                    _ => break,
                }
            }
        }
        TenantCommand::Disable { id } => db.set_tenant_disabled(&id, true).await.map_err(e)?,
        TenantCommand::Enable { id } => db.set_tenant_disabled(&id, false).await.map_err(e)?,
    }
    Ok(())
}

async fn keys(db: imagegate::store::Database, command: KeyCommand) -> Result<(), String> {
    use imagegate::store::keys::KeyInput;
    let e = |e: imagegate::store::StoreError| e.to_string();
    let duration = |s: &str| imagegate::config::parse_duration(s);
    match command {
        KeyCommand::Create {
            tenant,
            name,
            models,
            expires_in,
            manage_keys,
        } => {
            let expires_at = match expires_in {
                Some(d) => Some(imagegate::store::keys::now() + duration(&d)?.as_secs() as i64),
                None => None,
            };
            let created = db
                .create_key(&KeyInput {
                    tenant,
                    name,
                    models,
                    limits: None,
                    expires_at,
                    manage_keys,
                })
                .await
                .map_err(e)?;
            print_json(&created);
            eprintln!("The secret is shown only now; store it safely.");
        }
        KeyCommand::List { tenant } => {
            let mut after: Option<String> = None;
            loop {
                let page = db
                    .list_keys(tenant.as_deref(), None, after.as_deref(), 500)
                    .await
                    .map_err(e)?;
                for k in &page {
                    print_json(k);
                }
                match page.last() {
                    Some(k) if page.len() == 500 => after = Some(k.id.clone()),
                    _ => break,
                }
            }
        }
        KeyCommand::Revoke { id } => db.revoke_key(&id).await.map_err(e)?,
        KeyCommand::Rotate { id, grace } => {
            let rotated = db.rotate_key(&id, duration(&grace)?).await.map_err(e)?;
            print_json(&rotated);
            eprintln!("The new secret is shown only now; store it safely.");
        }
    }
    Ok(())
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

/// mimalloc: per-thread free lists and no global lock; on the request path (dozens of small
/// allocations per request) it took malloc and free from ~15% of the gateway's CPU to ~5%
/// (bench/README.md). Freed pages go back to the OS on their own after a short delay, and
/// answers of megabytes reuse its pages instead of a fresh mmap (a page fault per 4 KiB) each.
/// Built without transparent huge pages: with them idle RSS grew from 18 to 24 MiB.
/// `--features system-allocator` leaves the system's malloc in place, for heap profilers that
/// interpose on it (valgrind's massif, heaptrack; bench/README.md, "Memory per request in flight").
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: imagegate::allocator::MiMalloc = imagegate::allocator::MiMalloc;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| invalid(path, &errors))
}

/// Load + compile (certificates, JWT keys, key hashes, workflows, prices, routes), without
/// binding a socket or opening a database: `imagegate check`.
fn compiles(path: &std::path::Path, config: Config) -> Result<Config, ExitCode> {
    let checked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })?
        .block_on(async { server::check(&config) });
    checked
        .map(|()| config)
        .map_err(|errors| invalid(path, &errors))
}

/// Prints every configuration error by path; exit code 2.
fn invalid(path: &std::path::Path, errors: &imagegate::config::ConfigErrors) -> ExitCode {
    eprintln!("{}: invalid configuration:", path.display());
    for e in &errors.0 {
        eprintln!("  {e}");
    }
    ExitCode::from(2)
}

/// The request runtime: `workers` threads (0: one per usable CPU). One worker gets tokio's
/// single-threaded scheduler: measured on one pinned core (bench/README.md) it relays about
/// a third more requests per second than the work-stealing scheduler with one worker,
/// because no task is ever handed between threads.
fn serve_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .on_thread_park(imagegate::allocator::release_when_idle)
        .build()
}

fn runtime_block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Models {
            config,
            catalog,
            json,
        } => match load(&config) {
            Ok(c) => {
                use imagegate::server::models;
                let today = imagegate::clock::today();
                for w in models::shutdown_warnings(&c, &today) {
                    eprintln!("warning: {w}");
                }
                let rows = if catalog {
                    models::catalog_json(&c)
                } else {
                    models::served_json(&c)
                };
                if json {
                    println!("{}", serde_json::Value::from(rows));
                } else if catalog {
                    for r in rows {
                        println!("{r}");
                    }
                } else {
                    print!("{}", models::served_text(&c));
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Check { config } => match load(&config).and_then(|c| compiles(&config, c)) {
            Ok(c) => {
                for w in
                    imagegate::server::models::shutdown_warnings(&c, &imagegate::clock::today())
                {
                    eprintln!("warning: {w}");
                }
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
        Command::Tenants { command, store } => runtime_block_on(async move {
            store_command(&store.config, async move |db| tenants(db, command).await).await
        }),
        Command::Batches { command, store } => runtime_block_on(async move {
            store_command(&store.config, async move |db| {
                cli_batches::run(db, command).await
            })
            .await
        }),
        Command::Keys { command, store } => runtime_block_on(async move {
            store_command(&store.config, async move |db| keys(db, command).await).await
        }),
        Command::Usage {
            tenant,
            key,
            model,
            from,
            to,
            group_by,
            format,
            limit,
            store,
        } => runtime_block_on(async move {
            let limit = limit.to_string();
            let mut pairs: Vec<(&str, &str)> = vec![("format", &format), ("limit", &limit)];
            for (k, v) in [
                ("tenant", &tenant),
                ("key", &key),
                ("model", &model),
                ("from", &from),
                ("to", &to),
                ("group_by", &group_by),
            ] {
                if let Some(v) = v {
                    pairs.push((k, v));
                }
            }
            let report = match imagegate::metering::report::Report::from_pairs(pairs) {
                Ok(r) => r,
                Err((param, why)) => {
                    eprintln!("--{}: {why}", param.replace('_', "-"));
                    return ExitCode::from(2);
                }
            };
            store_command(&store.config, async move |db| {
                let text = report.render(&db).await.map_err(|e| e.to_string())?;
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                Ok(())
            })
            .await
        }),
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
            let runtime = match serve_runtime(config.server.worker_threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config, path.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.is::<imagegate::config::ConfigErrors>() => match e.downcast_ref() {
                    Some(errors) => invalid(&path, errors),
                    None => ExitCode::from(2),
                },
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
    match server::raise_open_file_limit() {
        Ok((now, before)) if now > before => {
            tracing::info!(from = before, to = now, "open-file limit raised")
        }
        Ok((now, _)) if now < 16_384 => tracing::warn!(
            limit = now,
            "open-file limit is low: each client connection takes one; raise LimitNOFILE / ulimit -Hn"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
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
