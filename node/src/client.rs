//! The client protocol: users talking to their node over QUIC.
//!
//! A client connects to the node's QUIC port with ALPN `conclave-client/8` (the wire version) and
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
//! nothing else about the room's members and keys. [`crate::RemoteNode`] is the
//! client side; a [`crate::User`] over it offers the same operations as one over a
//! local [`Node`].

use std::sync::Arc;

use conclave_actors::crypto::{Frame, SealedKey};
use conclave_actors::domain::chain::SignedLink;
use conclave_actors::domain::{self, Asked, Denial, Outcome, SignedRequest};
use conclave_actors::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use conclave_actors::wire::{decode_bounded, encode_bounded, WireError, ENVELOPE_BYTES_MAX};
use conclave_transports::framing::{
    read_frame, read_frame_body, read_frame_len, write_frame, FrameError,
};
use conclave_transports::quic::ClientConnection;
use conclave_transports::throttle::Throttle;
use quinn::VarInt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::admission::{Admission, Budgets};
pub use crate::admission::{
    CLIENT_REQUEST_BYTES_BUDGET, CLIENT_REQUEST_BYTES_PER_USER, CLIENT_SILENCE_MS_MAX,
    CONNECTIONS_PER_USER_MAX,
};
use crate::user::sealed::Carrier;
use crate::user::{ApiError, FrameSource, Position};
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
    /// Nothing arrived on the connection for [`super::CLIENT_SILENCE_MS_MAX`] while
    /// its user was at the limit: its client is taken to be gone.
    pub const SILENT: u32 = 0x44;
}

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// A request signed by the connection's user (users and rooms).
    Call(Box<SignedRequest>),
    /// A frame sealed and signed by the connection's user.
    Publish(Box<Frame>),
    /// A page of the keys of a room the node holds sealed to the connection's
    /// user: the epochs after `after`.
    Keys {
        /// The room.
        room: RoomId,
        /// Where the page starts (after this epoch; 0: the first).
        after: Epoch,
    },
    /// The room's frames the user may read, from a position: history, then live.
    Subscribe {
        /// The room.
        room: RoomId,
        /// Where to start.
        from: Position,
    },
    /// What became of something the connection's user asked that was queued for
    /// a room's home (see [`crate::User::outcome`]).
    Outcome {
        /// The room.
        room: RoomId,
        /// What was asked.
        asked: Asked,
    },
    /// Which node this is, and whom it sees.
    Whoami,
    /// Up to [`crate::user::CHAIN_LINKS_PER_CALL_MAX`] links of a room's membership chain,
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
    /// The first answer to a subscription: the sequence number it reads from (a
    /// client that must resume a `Live` one before any frame resumes there).
    Started {
        /// That sequence number.
        at: Seq,
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
    /// Chain links, in order (at most [`crate::user::CHAIN_LINKS_PER_CALL_MAX`]).
    Chain(Vec<SignedLink>),
    /// What became of what was asked (`None`: not decided yet, or not known).
    Decided(Option<Outcome>),
}

/// Why a request or response could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MessageError {
    /// The framing failed: too large, truncated, or the stream failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The bytes are not a message of the expected type (or it does not encode).
    #[error(transparent)]
    Wire(#[from] WireError),
}

pub(crate) async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), MessageError> {
    let bytes = encode_bounded(msg, CLIENT_MESSAGE_BYTES_MAX)?;
    write_frame(send, &bytes, CLIENT_MESSAGE_BYTES_MAX).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` if the stream ended cleanly before it.
pub(crate) async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, MessageError> {
    let Some(bytes) = read_frame(recv, CLIENT_MESSAGE_BYTES_MAX).await? else {
        return Ok(None);
    };
    Ok(Some(decode_bounded(&bytes, CLIENT_MESSAGE_BYTES_MAX)?))
}

/// Serves the client connections the transport hands over, until it stops.
pub(crate) async fn serve(node: Node, mut clients: mpsc::Receiver<ClientConnection>) {
    let admission = Arc::new(Admission::new());
    while let Some(client) = clients.recv().await {
        tokio::spawn(serve_connection(
            node.clone(),
            client,
            Arc::clone(&admission),
        ));
    }
}

fn refuse(conn: &quinn::Connection, user: UserId, denial: &Denial) {
    static REFUSED: Throttle = Throttle::new();
    let reason = denial.reason();
    let code = match denial {
        Denial::NotFound { .. } => code::NOT_FOUND,
        Denial::Revoked => code::REVOKED,
        Denial::Limit { .. } => code::TOO_MANY_CONNECTIONS,
        _ => code::UNAVAILABLE,
    };
    if let Some(suppressed) = REFUSED.admit() {
        tracing::warn!(%user, addr = %conn.remote_address(), reason, suppressed, "client refused");
    }
    metrics::counter!("conclave_client_auth_failures_total", "reason" => reason).increment(1);
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn serve_connection(node: Node, client: ClientConnection, admission: Arc<Admission>) {
    let ClientConnection { user, conn } = client;
    // Watched from before the registry check, so that a revocation right after it
    // is not missed.
    let revocations = node.revocations();
    if let Err(denial) = node.check_user(user) {
        refuse(&conn, user, &denial);
        return;
    }
    // Bounded per user: each connection may hold streams and buffered requests.
    let Some(budgets) = admission.admit(user, &conn).await else {
        let what = format!("at most {CONNECTIONS_PER_USER_MAX} connections per user");
        refuse(&conn, user, &Denial::Limit { what });
        return;
    };
    conclave_transports::quic::grant_client_allowance(&conn);
    tracing::debug!(%user, addr = %conn.remote_address(), "client connected");
    metrics::gauge!("conclave_clients_connected").increment(1.0);
    serve_streams(&node, user, &conn, revocations, Arc::new(budgets)).await;
    metrics::gauge!("conclave_clients_connected").decrement(1.0);
    admission.release(user, &conn);
}

/// Serves the connection's streams until it closes, or until its user is revoked:
/// then it is closed at once with [`code::REVOKED`], which ends every stream of it
/// (subscriptions included).
async fn serve_streams(
    node: &Node,
    user: UserId,
    conn: &quinn::Connection,
    mut revocations: broadcast::Receiver<UserId>,
    budgets: Arc<Budgets>,
) {
    let mut watching = true;
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(serve_stream(node.clone(), user, Arc::clone(&budgets), (send, recv)));
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

/// Why a request was refused before it was read: a metric label and the problem.
struct Unread {
    reason: &'static str,
    denial: Denial,
}

impl Unread {
    fn malformed(reason: &'static str, problem: impl ToString) -> Self {
        let problem = problem.to_string();
        Self {
            reason,
            denial: Denial::Malformed { problem },
        }
    }

    fn framing(error: FrameError) -> Self {
        let reason = match error {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::TruncatedPrefix { .. } | FrameError::TruncatedBody { .. } => "truncated",
            _ => "stream_failed",
        };
        Self::malformed(reason, error)
    }
}

/// Reads one request within the node's byte budget; `Ok(None)` if the stream
/// ended before one.
async fn read_request(
    recv: &mut quinn::RecvStream,
    budgets: &Budgets,
) -> Result<Option<ClientRequest>, Unread> {
    let len = match read_frame_len(recv, CLIENT_MESSAGE_BYTES_MAX).await {
        Ok(Some(len)) => len,
        Ok(None) => return Ok(None),
        Err(error) => return Err(Unread::framing(error)),
    };
    let _held = budgets
        .take(len)
        .map_err(|(reason, denial)| Unread { reason, denial })?;
    let body = read_frame_body(recv, len).await.map_err(Unread::framing)?;
    decode_bounded(&body, CLIENT_MESSAGE_BYTES_MAX)
        .map(Some)
        .map_err(|error| Unread::malformed("undecodable", error))
}

async fn serve_stream(
    node: Node,
    user: UserId,
    budgets: Arc<Budgets>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
) {
    static REFUSED: Throttle = Throttle::new();
    // A request arrives whole, promptly: a client trickling bytes is cut off.
    let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut recv, &budgets))
        .await
        .unwrap_or_else(|_| {
            Err(Unread::malformed(
                "too_slow",
                "request not received in time",
            ))
        });
    let request = match read {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(Unread { reason, denial }) => {
            metrics::counter!("conclave_client_requests_refused_total", "reason" => reason)
                .increment(1);
            if let Some(suppressed) = REFUSED.admit() {
                tracing::warn!(%user, reason, %denial, suppressed, "client request refused");
            }
            let _ = write_msg(&mut send, &ClientResponse::Refused(denial)).await;
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
        ApiError::Queued { .. } => ClientResponse::Queued,
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
        // The node checks that the user is active as it reads.
        ClientRequest::Keys { room, after } => match node.sealed_keys(user, room, after).await {
            Ok(keys) => ClientResponse::Keys(keys),
            Err(e) => refusal(e),
        },
        ClientRequest::Chain { room, from } => match Carrier::chain(node, user, room, from).await {
            Ok(links) => ClientResponse::Chain(links),
            Err(e) => refusal(e),
        },
        ClientRequest::Outcome { room, asked } => {
            match Carrier::outcome(node, user, room, asked).await {
                Ok(decided) => ClientResponse::Decided(decided),
                Err(e) => refusal(e),
            }
        }
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
            let at = frames.position();
            write_msg(send, &ClientResponse::Started { at }).await?;
            loop {
                let response = tokio::select! {
                    next = frames.next() => match next {
                        Some(Ok((seq, frame))) => ClientResponse::Frame { seq, frame: Box::new(frame) },
                        // The node is stopping: no refusal, which would end the
                        // subscription for good; the connection closes with the
                        // node and the client resumes on its next one.
                        Some(Err(ApiError::Route(_))) => break,
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
            // Held open until the connection closes (or the client stops it).
            let _ = send.stopped().await;
            return Ok(());
        }
    };
    write_msg(send, &response).await
}

/// Lets a reader of the registry state decide whether `user` may connect.
pub(crate) fn check_user(store: &conclave_storage::LmdbStore, user: UserId) -> Result<(), Denial> {
    let txn = store.read_txn().map_err(Denial::from)?;
    domain::state::registry::check_active(&txn, user).map(|_| ())
}
