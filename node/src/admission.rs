//! What one client may hold of a node: connections per user (only live ones
//! count) and the bytes of requests in progress, per user and for all users
//! together. The client protocol ([`crate::client`]) asks here before serving.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use conclave_actors::domain::Denial;
use conclave_actors::ids::UserId;
use quinn::VarInt;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::client::code;

/// How many connections one user may hold open to a node at once.
pub const CONNECTIONS_PER_USER_MAX: usize = 8;

/// A connection from which nothing arrived for this long does not count against
/// its user's limit: its client vanished (a process killed, a machine gone) without
/// closing. Live clients send a keep-alive every
/// [`conclave_transports::quic::CLIENT_KEEP_ALIVE_MS`].
pub const CLIENT_SILENCE_MS_MAX: u64 = 2_500;

/// Bytes of requests in progress the node holds for all clients together: a
/// request's announced length is taken from this budget (and its user's) before
/// its body is read, and returned once it is decoded. A request that does not fit
/// is refused (`busy`), so that no number of users can make the node buffer more.
pub const CLIENT_REQUEST_BYTES_BUDGET: usize = 64 << 20;

/// Bytes of requests in progress the node holds for one user (all their
/// connections): a user who announces large requests and trickles them blocks
/// only themselves. Four of the largest requests.
pub const CLIENT_REQUEST_BYTES_PER_USER: usize = 4 << 20;

/// The connections and budgets of every user served.
pub(crate) struct Admission {
    users: Mutex<BTreeMap<UserId, Held>>,
    budget: Arc<Semaphore>,
}

/// What a new connection of a user at the limit does first.
enum Probe {
    /// The user is below the limit: nothing.
    Unneeded,
    /// Look for silent connections among these (the probe is this caller's).
    Mine(Vec<quinn::Connection>),
    /// Another connection is looking: refused.
    Busy,
}

/// One user's live connections and byte budget.
struct Held {
    conns: Vec<quinn::Connection>,
    budget: Arc<Semaphore>,
    /// Whether a new connection is finding out which of these went silent: one
    /// at a time (others are refused meanwhile), so that a user cannot have
    /// connections pile up waiting.
    probing: bool,
}

impl Held {
    fn new() -> Self {
        Self {
            conns: Vec::new(),
            budget: Arc::new(Semaphore::new(CLIENT_REQUEST_BYTES_PER_USER)),
            probing: false,
        }
    }
}

/// The budgets a connection's requests draw from: its user's and the node's.
pub(crate) struct Budgets {
    user: Arc<Semaphore>,
    node: Arc<Semaphore>,
}

/// Why a request's bytes were not granted: a metric label and the denial.
pub(crate) type Refused = (&'static str, Denial);

impl Budgets {
    /// Takes `bytes` from both budgets, or refuses (`busy`) at once: the permits
    /// give them back when dropped.
    pub(crate) fn take(
        &self,
        bytes: usize,
    ) -> Result<(SemaphorePermit<'_>, SemaphorePermit<'_>), Refused> {
        // Beyond what a budget counts, it cannot fit: refused like any other.
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let busy = |whose: &str, budget: usize| {
            let what = format!("{whose} holds {budget} bytes of requests in progress");
            ("busy", Denial::Limit { what })
        };
        let user = self
            .user
            .try_acquire_many(bytes)
            .map_err(|_| busy("this user", CLIENT_REQUEST_BYTES_PER_USER))?;
        let node = self
            .node
            .try_acquire_many(bytes)
            .map_err(|_| busy("the node", CLIENT_REQUEST_BYTES_BUDGET))?;
        Ok((user, node))
    }
}

impl Admission {
    pub(crate) fn new() -> Self {
        Self {
            users: Mutex::new(BTreeMap::new()),
            budget: Arc::new(Semaphore::new(CLIENT_REQUEST_BYTES_BUDGET)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<UserId, Held>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits `conn` as one of `user`'s connections if they hold fewer than
    /// [`CONNECTIONS_PER_USER_MAX`] live ones: at the limit, their connections
    /// that stayed silent are closed (`silent`) and no longer count. The budgets
    /// its requests draw from, or `None` if refused.
    pub(crate) async fn admit(&self, user: UserId, conn: &quinn::Connection) -> Option<Budgets> {
        match self.probe_start(user) {
            Probe::Unneeded => {}
            // Another connection of the user is looking already: this one is
            // refused rather than left waiting (and holding its memory).
            Probe::Busy => return None,
            Probe::Mine(held) => self.close_silent(user, held).await,
        }
        let mut users = self.lock();
        let held = users.entry(user).or_insert_with(Held::new);
        held.conns.retain(|c| c.close_reason().is_none());
        if held.conns.len() >= CONNECTIONS_PER_USER_MAX {
            return None;
        }
        held.conns.push(conn.clone());
        Some(Budgets {
            user: Arc::clone(&held.budget),
            node: Arc::clone(&self.budget),
        })
    }

    /// Closes those of `user`'s connections `held` that stay silent, and gives the
    /// probe back.
    async fn close_silent(&self, user: UserId, held: Vec<quinn::Connection>) {
        let gone = silent(held).await;
        if let Some(held) = self.lock().get_mut(&user) {
            held.probing = false;
        }
        for gone in gone {
            tracing::info!(%user, addr = %gone.remote_address(), "closing a client connection that went silent");
            metrics::counter!("conclave_client_connections_silent_total").increment(1);
            gone.close(VarInt::from_u32(code::SILENT), b"silent");
        }
    }

    /// Whether `user`'s new connection must first look for silent ones, and takes
    /// the probe if so.
    fn probe_start(&self, user: UserId) -> Probe {
        let mut users = self.lock();
        let held = users.entry(user).or_insert_with(Held::new);
        held.conns.retain(|c| c.close_reason().is_none());
        if held.conns.len() < CONNECTIONS_PER_USER_MAX {
            return Probe::Unneeded;
        }
        if held.probing {
            return Probe::Busy;
        }
        held.probing = true;
        Probe::Mine(held.conns.clone())
    }

    /// Forgets `conn` among `user`'s connections.
    pub(crate) fn release(&self, user: UserId, conn: &quinn::Connection) {
        let mut users = self.lock();
        if let Some(held) = users.get_mut(&user) {
            held.conns.retain(|c| c.stable_id() != conn.stable_id());
            if held.conns.is_empty() && !held.probing {
                users.remove(&user);
            }
        }
    }
}

/// Of `conns`, those from which no datagram arrived during
/// [`CLIENT_SILENCE_MS_MAX`] (waited here).
async fn silent(conns: Vec<quinn::Connection>) -> Vec<quinn::Connection> {
    let heard = |c: &quinn::Connection| c.stats().udp_rx.datagrams;
    let before: Vec<u64> = conns.iter().map(heard).collect();
    tokio::time::sleep(Duration::from_millis(CLIENT_SILENCE_MS_MAX)).await;
    conns
        .into_iter()
        .zip(before)
        .filter(|(c, before)| c.close_reason().is_none() && heard(c) == *before)
        .map(|(c, _)| c)
        .collect()
}
