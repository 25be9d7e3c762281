//! The client protocol: users talking to their node over QUIC.
//!
//! A client connects to the node's QUIC port with ALPN `conclave-client/3` (the wire version) and
//! authenticates as a **user** with the same identity binding nodes use (an RFC
//! 7250 raw Ed25519 key, proven in the TLS handshake). The node then checks its
//! registry: an unknown user is refused with `not_found`, a revoked one with
//! `revoked` — as the connection's close reason (code and text), logged with the
//! user and address, and counted in `conclave_client_auth_failures_total{reason}`.
//! The node keeps serving everyone else. A user revoked while connected has every
//! connection closed at once with the same `revoked` code (their subscriptions end).
//!
//! Each request is one bidirectional stream: the client writes one postcard
//! [`ClientRequest`] in a frame of the transport's framing codec
//! ([`conclave_transports::framing`]: a u32 big-endian length, then the bytes; at most
//! [`CLIENT_MESSAGE_BYTES_MAX`]) and finishes; the node answers with one or more
//! [`ClientResponse`]s, framed the same way (a subscription streams frames until the client
//! stops or the user is removed). Requests are signed by the user, frames are
//! sealed and signed by the user: the node relays them to its actors exactly as the
//! embedding API does and never sees plaintext. A room's membership chain is
//! served as stored ([`ClientRequest::Chain`]); the client verifies it and believes
//! nothing else about the room's members and keys. [`RemoteNode`] is the client side; a
//! [`User`] over it offers the same operations as one over a local [`Node`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use conclave_actors::crypto::{Frame, SealedKey};
use conclave_actors::domain::chain::SignedLink;
use conclave_actors::domain::{self, Denial, Outcome, SignedRequest};
use conclave_actors::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use conclave_actors::wire::{decode_bounded, encode_bounded, WireError, ENVELOPE_BYTES_MAX};
use conclave_actors::Identity;
use conclave_transports::framing::{read_frame, write_frame, FrameError};
use conclave_transports::quic::{connect_client, ClientConnection, ClientLink};
use quinn::VarInt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::user::sealed::Carrier;
use crate::user::{ApiError, FrameSource, Position, User, CHAIN_LINKS_PER_CALL_MAX};
use crate::Node;

/// The largest request or response message.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = ENVELOPE_BYTES_MAX;

/// How long a client waits for the answer to one request.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Close codes of refused client connections.
pub mod code {
    /// The user is not registered on this node.
    pub const NOT_FOUND: u32 = 0x40;
    /// The user is revoked.
    pub const REVOKED: u32 = 0x41;
    /// The registry could not be read.
    pub const UNAVAILABLE: u32 = 0x42;
    /// The user holds [`super::CONNECTIONS_PER_USER_MAX`] connections already.
    pub const TOO_MANY_CONNECTIONS: u32 = 0x43;
}

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// A request signed by the connection's user (users and rooms).
    Call(Box<SignedRequest>),
    /// A frame sealed and signed by the connection's user.
    Publish(Box<Frame>),
    /// The keys of a room the node holds sealed to the connection's user.
    Keys {
        /// The room.
        room: RoomId,
    },
    /// The room's frames the user may read, from a position: history, then live.
    Subscribe {
        /// The room.
        room: RoomId,
        /// Where to start.
        from: Position,
    },
    /// Which node this is, and whom it sees.
    Whoami,
    /// Up to [`CHAIN_LINKS_PER_CALL_MAX`] links of a room's membership chain,
    /// from index `from` on (for a user who is or was a member).
    Chain {
        /// The room.
        room: RoomId,
        /// The index of the first link.
        from: u64,
    },
}

/// What a node answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    /// The outcome of a call or a publish.
    Outcome(Outcome),
    /// The request is queued for the room's home, which has not answered yet.
    Queued,
    /// Sealed keys, by epoch.
    Keys(Vec<(Epoch, SealedKey)>),
    /// One frame of a subscription.
    Frame {
        /// Its place in the room.
        seq: Seq,
        /// The frame (still encrypted).
        frame: Box<Frame>,
    },
    /// The subscription is over: the user was removed and has read all they may.
    Ended,
    /// The request was refused.
    Refused(Denial),
    /// The node and the user it authenticated.
    Whoami {
        /// The node.
        node: NodeId,
        /// The user.
        user: UserId,
    },
    /// Chain links, in order (at most [`CHAIN_LINKS_PER_CALL_MAX`]).
    Chain(Vec<SignedLink>),
}

/// Why a request or response could not be sent or received.
#[derive(Debug, thiserror::Error)]
enum MessageError {
    /// The framing failed: too large, truncated, or the stream failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The bytes are not a message of the expected type (or it does not encode).
    #[error(transparent)]
    Wire(#[from] WireError),
}

async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), MessageError> {
    let bytes = encode_bounded(msg, CLIENT_MESSAGE_BYTES_MAX)?;
    write_frame(send, &bytes, CLIENT_MESSAGE_BYTES_MAX).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` if the stream ended cleanly before it.
async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, MessageError> {
    let Some(bytes) = read_frame(recv, CLIENT_MESSAGE_BYTES_MAX).await? else {
        return Ok(None);
    };
    Ok(Some(decode_bounded(&bytes, CLIENT_MESSAGE_BYTES_MAX)?))
}

/// Serves the client connections the transport hands over, until it stops.
pub(crate) async fn serve(node: Node, mut clients: mpsc::Receiver<ClientConnection>) {
    let open = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    while let Some(client) = clients.recv().await {
        tokio::spawn(serve_connection(node.clone(), client, Arc::clone(&open)));
    }
}

/// How many connections one user may hold open to a node at once.
pub const CONNECTIONS_PER_USER_MAX: usize = 8;

/// Open connections per user.
type OpenConnections = Arc<std::sync::Mutex<BTreeMap<UserId, usize>>>;

fn refuse(conn: &quinn::Connection, user: UserId, denial: &Denial) {
    let reason = denial.reason();
    let code = match denial {
        Denial::NotFound { .. } => code::NOT_FOUND,
        Denial::Revoked => code::REVOKED,
        Denial::Limit { .. } => code::TOO_MANY_CONNECTIONS,
        _ => code::UNAVAILABLE,
    };
    tracing::warn!(%user, addr = %conn.remote_address(), reason, "client refused");
    metrics::counter!("conclave_client_auth_failures_total", "reason" => reason).increment(1);
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn serve_connection(node: Node, client: ClientConnection, open: OpenConnections) {
    let ClientConnection { user, conn } = client;
    // Watched from before the registry check, so that a revocation right after it
    // is not missed.
    let revocations = node.revocations();
    if let Err(denial) = node.check_user(user) {
        refuse(&conn, user, &denial);
        return;
    }
    // Bounded per user: each connection may hold streams and buffered requests.
    {
        let mut open = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(user).or_insert(0);
        if *count >= CONNECTIONS_PER_USER_MAX {
            drop(open);
            refuse(
                &conn,
                user,
                &Denial::Limit {
                    what: format!("at most {CONNECTIONS_PER_USER_MAX} connections per user"),
                },
            );
            return;
        }
        *count += 1;
    }
    tracing::debug!(%user, addr = %conn.remote_address(), "client connected");
    metrics::gauge!("conclave_clients_connected").increment(1.0);
    serve_streams(&node, user, &conn, revocations).await;
    metrics::gauge!("conclave_clients_connected").decrement(1.0);
    let mut open = open
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(count) = open.get_mut(&user) {
        *count -= 1;
        if *count == 0 {
            open.remove(&user);
        }
    }
}

/// Serves the connection's streams until it closes, or until its user is revoked:
/// then it is closed at once with [`code::REVOKED`], which ends every stream of it
/// (subscriptions included).
async fn serve_streams(
    node: &Node,
    user: UserId,
    conn: &quinn::Connection,
    mut revocations: broadcast::Receiver<UserId>,
) {
    let mut watching = true;
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(serve_stream(node.clone(), user, send, recv));
                }
                Err(_) => return,
            },
            revoked = revocations.recv(), if watching => match revoked {
                Ok(revoked) if revoked != user => {}
                Ok(_) => {
                    refuse(conn, user, &Denial::Revoked);
                    return;
                }
                // Missed revocations: the registry is the truth.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(denial) = node.check_user(user) {
                        refuse(conn, user, &denial);
                        return;
                    }
                }
                // The node is stopping; its transport closes the connection.
                Err(broadcast::error::RecvError::Closed) => watching = false,
            },
        }
    }
}

async fn serve_stream(
    node: Node,
    user: UserId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // A request arrives whole, promptly: a client trickling bytes is cut off.
    let read =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_msg::<ClientRequest>(&mut recv)).await {
            Ok(read) => read.map_err(|error| error.to_string()),
            Err(_) => Err("request not received in time".to_string()),
        };
    let request = match read {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(problem) => {
            metrics::counter!("conclave_client_requests_malformed_total").increment(1);
            let _ = write_msg(
                &mut send,
                &ClientResponse::Refused(Denial::Malformed { problem }),
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    if let Err(error) = answer(&node, user, request, &mut send).await {
        tracing::debug!(%user, %error, "client stream ended");
    }
    let _ = send.finish();
}

fn refusal(error: ApiError) -> ClientResponse {
    match error {
        ApiError::Denied(denial) => ClientResponse::Refused(denial),
        ApiError::Queued => ClientResponse::Queued,
        other => ClientResponse::Refused(Denial::Malformed {
            problem: other.to_string(),
        }),
    }
}

fn outcome(result: Result<Option<Outcome>, ApiError>) -> ClientResponse {
    match result {
        Ok(Some(outcome)) => ClientResponse::Outcome(outcome),
        Ok(None) => ClientResponse::Queued,
        Err(e) => refusal(e),
    }
}

async fn answer(
    node: &Node,
    user: UserId,
    request: ClientRequest,
    send: &mut quinn::SendStream,
) -> Result<(), MessageError> {
    let response = match request {
        ClientRequest::Call(req) if req.request.user != user => {
            ClientResponse::Refused(Denial::Malformed {
                problem: "request signed by another user than the connection's".into(),
            })
        }
        ClientRequest::Call(req) => outcome(node.call(*req).await),
        ClientRequest::Publish(frame) if frame.sender != user => {
            ClientResponse::Refused(Denial::Malformed {
                problem: "frame sent by another user than the connection's".into(),
            })
        }
        ClientRequest::Publish(frame) => outcome(Carrier::publish(node, *frame).await),
        ClientRequest::Keys { room } => match node.check_user(user) {
            Err(denial) => ClientResponse::Refused(denial),
            Ok(()) => match node.sealed_keys(user, room).await {
                Ok(keys) => ClientResponse::Keys(keys),
                Err(e) => refusal(e),
            },
        },
        ClientRequest::Chain { room, from } => match Carrier::chain(node, user, room, from).await {
            Ok(links) => ClientResponse::Chain(links),
            Err(e) => refusal(e),
        },
        ClientRequest::Whoami => ClientResponse::Whoami {
            node: node.id(),
            user,
        },
        ClientRequest::Subscribe { room, from } => {
            if let Err(denial) = node.check_user(user) {
                return write_msg(send, &ClientResponse::Refused(denial)).await;
            }
            let mut frames = match node.frames(user, room, from).await {
                Ok(frames) => frames,
                Err(e) => return write_msg(send, &refusal(e)).await,
            };
            loop {
                let response = tokio::select! {
                    next = frames.next() => match next {
                        Some(Ok((seq, frame))) => ClientResponse::Frame { seq, frame: Box::new(frame) },
                        Some(Err(e)) => refusal(e),
                        None => ClientResponse::Ended,
                    },
                    // The client went away: stop reading the store for it.
                    _ = send.stopped() => return Ok(()),
                };
                let last = !matches!(response, ClientResponse::Frame { .. });
                write_msg(send, &response).await?;
                if last {
                    return Ok(());
                }
            }
        }
    };
    write_msg(send, &response).await
}

/// A user's node reached over the client protocol. Cheap to clone.
#[derive(Clone)]
pub struct RemoteNode {
    link: Arc<ClientLink>,
}

impl std::fmt::Debug for RemoteNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteNode")
            .field("node", &self.link.node)
            .field("addr", &self.link.conn.remote_address())
            .finish()
    }
}

/// What a connection error means for the caller: the node's refusal reasons become
/// denials.
fn connection_error(error: &quinn::ConnectionError) -> ApiError {
    if let quinn::ConnectionError::ApplicationClosed(close) = error {
        let code = close.error_code.into_inner();
        if code == u64::from(code::NOT_FOUND) {
            return ApiError::Denied(Denial::NotFound {
                what: "user (refused by the node)".into(),
            });
        }
        if code == u64::from(code::REVOKED) {
            return ApiError::Denied(Denial::Revoked);
        }
        if code == u64::from(code::TOO_MANY_CONNECTIONS) {
            return ApiError::Denied(Denial::Limit {
                what: format!("at most {CONNECTIONS_PER_USER_MAX} connections per user"),
            });
        }
    }
    ApiError::Connection(error.to_string())
}

impl RemoteNode {
    /// Connects to the node at `addr` as `identity` and checks that the node
    /// accepts the user (refusals come back as [`ApiError::Denied`] with the node's
    /// reason). With `expected`, the node must prove it is that node.
    pub async fn connect(
        identity: &Identity,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<User<RemoteNode>, ApiError> {
        let link = connect_client(identity, addr, expected)
            .await
            .map_err(|e| ApiError::Connection(e.to_string()))?;
        let remote = RemoteNode {
            link: Arc::new(link),
        };
        match remote.roundtrip(&ClientRequest::Whoami).await? {
            ClientResponse::Whoami { .. } => Ok(User::new(remote, identity.clone())),
            other => Err(ApiError::Connection(format!("unexpected answer {other:?}"))),
        }
    }

    /// The id of the node this connection reached, as the node proved it in the
    /// handshake (what a client pins).
    pub fn node_id(&self) -> NodeId {
        self.link.node
    }

    /// The address of the node.
    pub fn addr(&self) -> SocketAddr {
        self.link.conn.remote_address()
    }

    async fn open(&self, request: &ClientRequest) -> Result<quinn::RecvStream, ApiError> {
        let conn = &self.link.conn;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| connection_error(&e))?;
        if let Err(error) = write_msg(&mut send, request).await {
            return Err(match conn.close_reason() {
                Some(reason) => connection_error(&reason),
                None => ApiError::Connection(error.to_string()),
            });
        }
        let _ = send.finish();
        Ok(recv)
    }

    async fn read(&self, recv: &mut quinn::RecvStream) -> Result<ClientResponse, ApiError> {
        match read_msg(recv).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(ApiError::Connection("the node closed the stream".into())),
            Err(error) => Err(match self.link.conn.close_reason() {
                Some(reason) => connection_error(&reason),
                None => ApiError::Connection(error.to_string()),
            }),
        }
    }

    /// One request, one response, within [`REQUEST_TIMEOUT`] (a node that died
    /// mid-request is not waited for until the connection's idle timeout).
    async fn roundtrip(&self, request: &ClientRequest) -> Result<ClientResponse, ApiError> {
        let exchange = async {
            let mut recv = self.open(request).await?;
            self.read(&mut recv).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ApiError::Timeout(REQUEST_TIMEOUT))?
    }

    async fn outcome(&self, request: ClientRequest) -> Result<Option<Outcome>, ApiError> {
        match self.roundtrip(&request).await? {
            ClientResponse::Outcome(outcome) => Ok(Some(outcome)),
            ClientResponse::Queued => Ok(None),
            ClientResponse::Refused(denial) => Ok(Some(Outcome::Denied(denial))),
            other => Err(ApiError::Connection(format!("unexpected answer {other:?}"))),
        }
    }
}

impl Carrier for RemoteNode {
    type Frames = RemoteFrames;

    fn node_id(&self) -> NodeId {
        self.link.node
    }

    async fn call(&self, req: SignedRequest) -> Result<Option<Outcome>, ApiError> {
        self.outcome(ClientRequest::Call(Box::new(req))).await
    }

    async fn publish(&self, frame: Frame) -> Result<Option<Outcome>, ApiError> {
        self.outcome(ClientRequest::Publish(Box::new(frame))).await
    }

    async fn chain(
        &self,
        _user: UserId,
        room: RoomId,
        from: u64,
    ) -> Result<Vec<SignedLink>, ApiError> {
        // The node answers for the connection's user only.
        match self.roundtrip(&ClientRequest::Chain { room, from }).await? {
            ClientResponse::Chain(links) if links.len() <= CHAIN_LINKS_PER_CALL_MAX => Ok(links),
            ClientResponse::Chain(links) => Err(ApiError::Connection(format!(
                "the node sent {} chain links, more than the {CHAIN_LINKS_PER_CALL_MAX} asked for",
                links.len()
            ))),
            ClientResponse::Refused(denial) => Err(ApiError::Denied(denial)),
            other => Err(ApiError::Connection(format!("unexpected answer {other:?}"))),
        }
    }

    async fn sealed_keys(
        &self,
        _user: UserId,
        room: RoomId,
    ) -> Result<Vec<(Epoch, SealedKey)>, ApiError> {
        // The node answers for the connection's user only.
        match self.roundtrip(&ClientRequest::Keys { room }).await? {
            ClientResponse::Keys(keys) => Ok(keys),
            ClientResponse::Refused(denial) => Err(ApiError::Denied(denial)),
            other => Err(ApiError::Connection(format!("unexpected answer {other:?}"))),
        }
    }

    async fn frames(
        &self,
        _user: UserId,
        room: RoomId,
        from: Position,
    ) -> Result<RemoteFrames, ApiError> {
        let recv = self.open(&ClientRequest::Subscribe { room, from }).await?;
        Ok(RemoteFrames {
            node: self.clone(),
            recv,
            done: false,
        })
    }
}

/// A subscription's frames, streamed by the node.
pub struct RemoteFrames {
    node: RemoteNode,
    recv: quinn::RecvStream,
    done: bool,
}

impl FrameSource for RemoteFrames {
    async fn next(&mut self) -> Option<Result<(Seq, Frame), ApiError>> {
        if self.done {
            return None;
        }
        let response = self.node.read(&mut self.recv).await;
        match response {
            Ok(ClientResponse::Frame { seq, frame }) => Some(Ok((seq, *frame))),
            Ok(ClientResponse::Ended) => {
                self.done = true;
                None
            }
            Ok(ClientResponse::Refused(denial)) => {
                self.done = true;
                Some(Err(ApiError::Denied(denial)))
            }
            Ok(other) => {
                self.done = true;
                Some(Err(ApiError::Connection(format!(
                    "unexpected answer {other:?}"
                ))))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Lets a reader of the registry state decide whether `user` may connect.
pub(crate) fn check_user(store: &conclave_storage::LmdbStore, user: UserId) -> Result<(), Denial> {
    let txn = store.read_txn().map_err(Denial::from)?;
    domain::state::registry::check_active(&txn, user).map(|_| ())
}
