//! Dependencies that go away under load, for real: a private PostgreSQL server stopped
//! (`pg_ctl stop -m immediate`) and started again while clients keep sending, a private Redis
//! SIGKILLed and restarted, a private S3 server (moto) killed and restarted, the data disk
//! filled. The gateway answers only 200 or a retryable 503 meanwhile, recovers without a
//! restart, and afterwards every 200 a client saw has exactly one ledger row: nothing lost,
//! nothing doubled. Needs PostgreSQL's and Redis's server binaries and moto (scripts/test.sh
//! installs them) and, for the full disk, root to mount a tmpfs; without them a test says so
//! and passes.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "outage-admin-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The directory of PostgreSQL's server binaries, if installed.
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL tool, as the postgres user when we are root (initdb refuses root).
fn pg(bin: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    let exe = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args).output().unwrap()
}

/// A private PostgreSQL cluster on a free port, in a temporary directory.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn start() -> Option<Postgres> {
        let bin = pg_bin()?;
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let uid = Command::new("id").args(["-u", "postgres"]).output().ok()?;
            let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        }
        let data = dir.path().join("data");
        let out = pg(
            &bin,
            "initdb",
            &["-D", data.to_str()?, "-U", "postgres", "--auth=trust", "-N"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            bin,
            dir,
            port: free_port(),
        };
        pg.up();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        let out = pg(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn down(&self) {
        let out = pg(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
    }
}

/// What the clients saw: request id -> status.
type Seen = Arc<Mutex<Vec<(String, u16)>>>;

/// `clients` loops sending generations with their own request ids until `stop`.
fn load(
    gw: &Gateway,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Seen, Vec<tokio::task::JoinHandle<()>>) {
    let seen: Seen = Arc::default();
    let tasks = (0..clients)
        .map(|c| {
            let (url, seen, stop) = (gw.url("/v1/images/generations"), seen.clone(), stop.clone());
            tokio::spawn(async move {
                let http = client();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    let id = format!("outage-{c}-{i}");
                    let resp = http
                        .post(&url)
                        .bearer_auth(DEMO_KEY)
                        .header("x-request-id", &id)
                        .json(&json!({"model": "dall-e-2", "prompt": "x", "size": "256x256", "response_format": "b64_json"}))
                        .send()
                        .await;
                    let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
                    seen.lock().unwrap().push((id, status));
                    if status != 200 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}

/// The ledger's rows by request id, once it holds `want` successful rows (or after 30 s).
async fn ledger_rows(gw: &Gateway, want: usize) -> HashMap<String, Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client()
            .get(format!(
                "{}/admin/v1/usage?tenant=demo&limit=100000",
                gw.admin_base
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            let rows = resp.json::<Value>().await.unwrap()["data"]
                .as_array()
                .unwrap()
                .clone();
            let ok = rows.iter().filter(|r| r["status"] == 200).count();
            if ok >= want || Instant::now() > deadline {
                let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
                for r in rows {
                    by_id
                        .entry(r["request_id"].as_str().unwrap().to_string())
                        .or_default()
                        .push(r);
                }
                return by_id;
            }
        }
        assert!(Instant::now() < deadline, "the ledger did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn config(state: &str) -> String {
    sandbox_config("", "")
        // Limits, so every request asks Redis (when there is one).
        .replace(
            "demo: {models: [\"*\"]}",
            "demo: {models: [\"*\"], limits: {requests_per_minute: 100000, concurrent_requests: 50}}",
        )
        .replace(
        "log: {level: warn}",
        &format!(
            "log: {{level: error}}\nadmin: {{tokens_sha256: [{}]}}\nstate: {state}",
            hex::encode(imagegate::auth::hash_secret(ADMIN))
        ),
    )
}

/// Checks the clients' view against the ledger: only 200 or 503, and each 200 in it once.
async fn every_success_once(gw: &Gateway, seen: &Seen) -> (usize, usize) {
    let seen = seen.lock().unwrap().clone();
    let bad: Vec<_> = seen
        .iter()
        .filter(|(_, s)| *s != 200 && *s != 503)
        .collect();
    assert!(bad.is_empty(), "answers other than 200/503: {bad:?}");
    let ok: Vec<&String> = seen
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(id, _)| id)
        .collect();
    let rows = ledger_rows(gw, ok.len()).await;
    for id in &ok {
        let found = rows
            .get(*id)
            .map_or(0, |r| r.iter().filter(|r| r["status"] == 200).count());
        assert_eq!(found, 1, "request {id}: {found} ledger rows for one 200");
    }
    let doubled = rows.values().filter(|r| r.len() > 1).count();
    assert_eq!(doubled, 0, "a request has two ledger rows");
    (ok.len(), seen.len() - ok.len())
}

#[tokio::test]
async fn postgres_stopped_and_restarted_under_load_loses_and_doubles_nothing() {
    let Some(pg) = Postgres::start() else {
        eprintln!("PostgreSQL's server binaries are not installed: skipped");
        return;
    };
    let gw = Gateway::start(&config(&format!(
        "{{store: postgres, postgres: \"{}\"}}",
        pg.url()
    )))
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = load(&gw, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = seen.lock().unwrap().len();
    pg.down();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.up();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, refused) = every_success_once(&gw, &seen).await;
    assert!(
        before > 0 && ok > before,
        "served before and after: {before} then {ok}"
    );
    // Recovered without a restart: a request now is served and recorded.
    let resp = gw
        .generate(json!({"model": "dall-e-2", "prompt": "after", "size": "256x256"}))
        .await;
    assert_eq!(resp.status(), 200);
    eprintln!("postgres outage: {ok} served, {refused} refused with 503, none lost or doubled");
}

/// A private server process, SIGKILLed when dropped (a failed assertion must not leave it
/// running, holding the test's output open).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private redis-server on a free port.
fn redis(port: u16) -> Option<Server> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
        .map(Server)
}

#[tokio::test]
async fn redis_killed_and_restarted_under_load_recovers_and_loses_nothing() {
    let port = free_port();
    let Some(server) = redis(port) else {
        eprintln!("redis-server is not installed: skipped");
        return;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = Gateway::start(&config(&format!(
        "{{store: sqlite, redis: {{url: \"redis://127.0.0.1:{port}/0\", on_failure: open, timeout: 200ms}}}}"
    )))
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = load(&gw, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SIGKILL, as a crash.
    drop(server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = gw.metrics().await;
    let server = redis(port).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, refused) = every_success_once(&gw, &seen).await;
    // The alert while it was gone.
    let failures = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("imagegate_redis_failures_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        failures(&during) > 0.0,
        "no Redis failure counted while it was down"
    );
    // Back: failures stop growing.
    let settled = failures(&gw.metrics().await);
    for _ in 0..5 {
        let resp = gw
            .generate(json!({"model": "dall-e-2", "prompt": "after", "size": "256x256"}))
            .await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        failures(&gw.metrics().await),
        settled,
        "Redis still failing after its return"
    );
    drop(server);
    eprintln!("redis outage: {ok} served, {refused} refused, none lost or doubled");
}

/// A private moto S3 server on `port`, killed when dropped.
fn moto(port: u16) -> Option<Server> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    Some(Server(child))
}

/// Waits for moto and creates the bucket (moto keeps nothing across a restart).
async fn bucket_up(port: u16) {
    for _ in 0..100 {
        if let Ok(r) = client()
            .put(format!("http://127.0.0.1:{port}/outage"))
            .send()
            .await
        {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto did not come up");
}

#[tokio::test]
async fn the_s3_store_down_is_a_retryable_503_for_urls_only_and_recovers() {
    let port = free_port();
    let Some(server) = moto(port) else {
        eprintln!("moto_server is not installed in .venv: skipped");
        return;
    };
    bucket_up(port).await;
    let yaml = config("{store: sqlite}").replace(
        "admin: {",
        &format!(
            "images: {{store: s3, s3: {{bucket: outage, endpoint: \"http://127.0.0.1:{port}\", path_style: true, access_key_id: t, secret_access_key: t}}}}\nadmin: {{"
        ),
    );
    let gw = Gateway::start(&yaml).await;
    let url =
        json!({"model": "dall-e-2", "prompt": "x", "size": "256x256", "response_format": "url"});
    let b64 = json!({"model": "dall-e-2", "prompt": "x", "size": "256x256", "response_format": "b64_json"});
    assert_eq!(gw.generate(url.clone()).await.status(), 200);

    drop(server);
    let started = Instant::now();
    let resp = gw.generate(url.clone()).await;
    assert_eq!(resp.status(), 503, "a store outage is retryable");
    assert!(resp.headers().contains_key("retry-after"));
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "image_store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the store's retries held the request {:?}",
        started.elapsed()
    );
    // Pictures that need no store are still served.
    assert_eq!(gw.generate(b64.clone()).await.status(), 200);

    let _server = moto(port).unwrap();
    bucket_up(port).await;
    let resp = gw.generate(url).await;
    assert_eq!(resp.status(), 200, "recovered without a restart");
    let link = resp.json::<Value>().await.unwrap()["data"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(client().get(link).send().await.unwrap().status(), 200);
    // Nothing was charged for the failed one: its ledger row (if any) costs nothing.
    let rows = ledger_rows(&gw, 3).await;
    let failed_cost: u64 = rows
        .values()
        .flatten()
        .filter(|r| r["status"] != 200)
        .map(|r| r["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(failed_cost, 0);
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Fills the file system under `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let mut byte = [0u8; 1];
    while f.write_all(&byte).is_ok() {
        byte[0] ^= 1;
    }
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_loses_no_usage_record_and_recovers_when_space_returns() {
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("cannot mount a tmpfs (needs root): skipped");
        return;
    };
    let yaml = config("{store: sqlite}").replace(
        "data_dir: ${DATA_DIR}",
        &format!("data_dir: {}", disk.path().display()),
    );
    let gw = Gateway::start(&yaml).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = load(&gw, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = seen.lock().unwrap().len();
    let dir = disk.path().to_path_buf();
    let filler = tokio::task::spawn_blocking(move || fill(&dir))
        .await
        .unwrap();
    // A picture to host has nowhere to go: a retryable 503, nothing charged.
    let probe = gw
        .generate(json!({"model": "dall-e-2", "prompt": "probe", "size": "256x256"}))
        .await;
    assert_eq!(probe.status(), 503);
    let err: Value = probe.json().await.unwrap();
    assert_eq!(err["error"]["code"], "image_store_unavailable");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = seen.lock().unwrap().len() - before;
    std::fs::remove_file(filler).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, refused) = every_success_once(&gw, &seen).await;
    let resp = gw
        .generate(json!({"model": "dall-e-2", "prompt": "after", "size": "256x256", "response_format": "b64_json"}))
        .await;
    assert_eq!(resp.status(), 200, "recovered without a restart");
    assert!(during > 0);
    eprintln!("full disk: {ok} served, {refused} refused, none lost or doubled");
}
