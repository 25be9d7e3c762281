//! The client side of the client protocol ([`crate::client`]): [`RemoteNode`], a
//! user's node reached over QUIC.
//!
//! A connection that dies (its node crashed and came back, or went away for
//! longer than the idle timeout) is replaced by a new one at the next request; a
//! subscription whose connection dies resumes where it was on a new one. A node
//! restarted after a crash resets its clients' connections at their first packet
//! (its stateless-reset key is derived from its identity), and clients send a
//! keep-alive every second, so a subscriber is receiving again about a second
//! after its node is back. A refusal by the node (`not_found`, `revoked`, a
//! limit) is never retried. [`RemoteNode::close`] closes the connection and waits
//! (briefly) until the node has been told, so that it stops counting it at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conclave_actors::crypto::{Frame, SealedKey};
use conclave_actors::domain::chain::SignedLink;
use conclave_actors::domain::{Asked, Denial, Outcome, SignedRequest};
use conclave_actors::ids::{Epoch, NodeId, RoomId, Seq, UserId};
use conclave_actors::Identity;
use conclave_transports::quic::{connect_client, ClientLink};
use quinn::VarInt;

use crate::client::{
    code, read_msg, write_msg, ClientRequest, ClientResponse, CONNECTIONS_PER_USER_MAX,
    REQUEST_TIMEOUT,
};
use crate::user::sealed::Carrier;
use crate::user::{ApiError, FrameSource, Position, User, CHAIN_LINKS_PER_CALL_MAX};

/// How long one reconnection may take before the request that needed it fails.
const RECONNECT_WAIT_MS_MAX: u64 = 2_000;
/// How long a subscription whose connection died keeps trying to resume before it
/// reports the failure.
const RESUBSCRIBE_WAIT_MS_MAX: u64 = 30_000;
/// The first pause between two attempts to resume a subscription; it doubles per
/// failure up to [`RESUBSCRIBE_DELAY_MS_MAX`].
const RESUBSCRIBE_DELAY_MS_MIN: u64 = 50;
/// The largest pause between two attempts to resume a subscription.
const RESUBSCRIBE_DELAY_MS_MAX: u64 = 1_000;
/// How long [`RemoteNode::close`] waits for the node to acknowledge the close.
const CLOSE_WAIT_MS_MAX: u64 = 500;
/// The application close code of a client that is done.
const CLOSE_DONE: u32 = 0;

/// A user's node reached over the client protocol. Cheap to clone; clones share
/// the connection.
#[derive(Clone)]
pub struct RemoteNode {
    inner: Arc<Remote>,
}

struct Remote {
    identity: Identity,
    addr: SocketAddr,
    /// The node the first connection proved it is: every reconnection pins it.
    node: NodeId,
    /// The current connection; replaced when it dies.
    link: tokio::sync::Mutex<Arc<ClientLink>>,
    /// Set by [`RemoteNode::close`]: no more reconnections.
    closed: AtomicBool,
}

impl std::fmt::Debug for RemoteNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteNode")
            .field("node", &self.inner.node)
            .field("addr", &self.inner.addr)
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

/// Whether a connection that ended with `error` is worth replacing: not when this
/// client closed it, nor when the node refused the user for good (`not_found`,
/// `revoked`); a `limit` refusal is worth another try at the next request.
fn replaceable(error: &quinn::ConnectionError) -> bool {
    let refused = match connection_error(error) {
        ApiError::Denied(Denial::Limit { .. }) => false,
        ApiError::Denied(_) => true,
        _ => false,
    };
    !matches!(error, quinn::ConnectionError::LocallyClosed) && !refused
}

/// Whether a request may be sent again after its connection died: only reads (a
/// call or a publish may have been applied before the connection broke).
fn rereadable(request: &ClientRequest) -> bool {
    matches!(
        request,
        ClientRequest::Keys { .. }
            | ClientRequest::Chain { .. }
            | ClientRequest::Outcome { .. }
            | ClientRequest::Whoami
            | ClientRequest::Subscribe { .. }
    )
}

/// A node's answer that does not fit what was asked.
fn unexpected(other: ClientResponse) -> ApiError {
    ApiError::Connection(format!("unexpected answer {other:?}"))
}

impl RemoteNode {
    /// Connects to the node at `addr` as `identity` and checks that the node
    /// accepts the user (refusals come back as [`ApiError::Denied`] with the node's
    /// reason). With `expected`, the node must prove it is that node; later
    /// reconnections always pin the node this first connection reached.
    pub async fn connect(
        identity: &Identity,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<User<RemoteNode>, ApiError> {
        let link = connect_client(identity, addr, expected)
            .await
            .map_err(|e| ApiError::Connection(e.to_string()))?;
        let remote = RemoteNode {
            inner: Arc::new(Remote {
                identity: identity.clone(),
                addr,
                node: link.node,
                link: tokio::sync::Mutex::new(Arc::new(link)),
                closed: AtomicBool::new(false),
            }),
        };
        match remote.roundtrip(&ClientRequest::Whoami).await? {
            ClientResponse::Whoami { .. } => Ok(User::new(remote, identity.clone())),
            other => Err(unexpected(other)),
        }
    }

    /// The id of the node this connection reached, as the node proved it in the
    /// handshake (what a client pins).
    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    /// The address of the node.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Closes the connection (every clone's; subscriptions end) and waits up to
    /// half a second for the node to acknowledge, so that it stops counting the
    /// connection against the user's limit at once. Call it before the process
    /// exits: a connection that simply vanishes is counted until the node sees it
    /// silent.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let link = Arc::clone(&*self.inner.link.lock().await);
        link.conn.close(VarInt::from_u32(CLOSE_DONE), b"done");
        let wait = Duration::from_millis(CLOSE_WAIT_MS_MAX);
        let _ = tokio::time::timeout(wait, link.endpoint.wait_idle()).await;
    }

    /// The live connection: the current one, or a new one if it died (see
    /// [`replaceable`]).
    async fn link(&self) -> Result<Arc<ClientLink>, ApiError> {
        let mut link = self.inner.link.lock().await;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(ApiError::Connection("closed by this client".into()));
        }
        match link.conn.close_reason() {
            None => return Ok(Arc::clone(&link)),
            Some(error) if !replaceable(&error) => return Err(connection_error(&error)),
            Some(_) => {}
        }
        let Remote {
            identity,
            addr,
            node,
            ..
        } = &*self.inner;
        let wait = Duration::from_millis(RECONNECT_WAIT_MS_MAX);
        let fresh = tokio::time::timeout(wait, connect_client(identity, *addr, Some(*node)))
            .await
            .map_err(|_| ApiError::Timeout(wait))?
            .map_err(|e| ApiError::Connection(e.to_string()))?;
        tracing::info!(node = %node, %addr, "reconnected to the node");
        metrics::counter!("conclave_client_reconnects_total").increment(1);
        *link = Arc::new(fresh);
        Ok(Arc::clone(&link))
    }

    /// Whether the connection `link` died in a way a new one can mend.
    fn died(link: &ClientLink) -> bool {
        link.conn.close_reason().is_some_and(|e| replaceable(&e))
    }

    /// Sends `request` on a new stream of the live connection; returns the
    /// stream's receiving half and the connection it is on.
    async fn open(
        &self,
        request: &ClientRequest,
    ) -> Result<(quinn::RecvStream, Arc<ClientLink>), ApiError> {
        let link = self.link().await?;
        let recv = Self::send_on(&link, request).await?;
        Ok((recv, link))
    }

    /// Sends `request` on a new stream of `link`.
    async fn send_on(
        link: &ClientLink,
        request: &ClientRequest,
    ) -> Result<quinn::RecvStream, ApiError> {
        let (mut send, recv) = link
            .conn
            .open_bi()
            .await
            .map_err(|e| connection_error(&e))?;
        if let Err(error) = write_msg(&mut send, request).await {
            return Err(match link.conn.close_reason() {
                Some(reason) => connection_error(&reason),
                None => ApiError::Connection(error.to_string()),
            });
        }
        let _ = send.finish();
        Ok(recv)
    }

    /// One request and its response on the live connection, and whether a
    /// failure came from that connection dying (which a new one can mend).
    async fn exchange(&self, request: &ClientRequest) -> (Result<ClientResponse, ApiError>, bool) {
        let link = match self.link().await {
            Ok(link) => link,
            Err(error) => return (Err(error), false),
        };
        let answer = match Self::send_on(&link, request).await {
            Ok(mut recv) => Self::read(&link, &mut recv).await,
            Err(error) => Err(error),
        };
        let died = answer.is_err() && Self::died(&link);
        (answer, died)
    }

    async fn read(
        link: &ClientLink,
        recv: &mut quinn::RecvStream,
    ) -> Result<ClientResponse, ApiError> {
        match read_msg(recv).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(ApiError::Connection("the node closed the stream".into())),
            Err(error) => Err(match link.conn.close_reason() {
                Some(reason) => connection_error(&reason),
                None => ApiError::Connection(error.to_string()),
            }),
        }
    }

    /// One request, one response, within [`REQUEST_TIMEOUT`] (a node that died
    /// mid-request is not waited for until the connection's idle timeout). A read
    /// whose connection died is asked once more on a new connection.
    async fn roundtrip(&self, request: &ClientRequest) -> Result<ClientResponse, ApiError> {
        let exchange = async {
            match self.exchange(request).await {
                (Err(_), true) if rereadable(request) => self.exchange(request).await.0,
                (answer, _) => answer,
            }
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
            other => Err(unexpected(other)),
        }
    }
}

impl Carrier for RemoteNode {
    type Frames = RemoteFrames;

    fn node_id(&self) -> NodeId {
        self.inner.node
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
            other => Err(unexpected(other)),
        }
    }

    async fn sealed_keys(
        &self,
        _user: UserId,
        room: RoomId,
        after: Epoch,
    ) -> Result<Vec<(Epoch, SealedKey)>, ApiError> {
        // The node answers for the connection's user only.
        match self.roundtrip(&ClientRequest::Keys { room, after }).await? {
            ClientResponse::Keys(keys) => Ok(keys),
            ClientResponse::Refused(denial) => Err(ApiError::Denied(denial)),
            other => Err(unexpected(other)),
        }
    }

    async fn outcome(
        &self,
        _user: UserId,
        room: RoomId,
        asked: Asked,
    ) -> Result<Option<Outcome>, ApiError> {
        // The node answers for the connection's user only.
        match self
            .roundtrip(&ClientRequest::Outcome { room, asked })
            .await?
        {
            ClientResponse::Decided(decided) => Ok(decided),
            ClientResponse::Refused(denial) => Err(ApiError::Denied(denial)),
            other => Err(unexpected(other)),
        }
    }

    async fn frames(
        &self,
        _user: UserId,
        room: RoomId,
        from: Position,
    ) -> Result<RemoteFrames, ApiError> {
        let stream = self.open(&ClientRequest::Subscribe { room, from }).await?;
        Ok(RemoteFrames {
            node: self.clone(),
            room,
            from,
            stream: Some(stream),
            done: false,
        })
    }
}

/// A subscription's frames, streamed by the node; resumed on a new connection
/// when the connection dies.
pub struct RemoteFrames {
    node: RemoteNode,
    room: RoomId,
    /// Where to resume: after the last frame returned.
    from: Position,
    /// The stream and its connection; `None` after the connection died.
    stream: Option<(quinn::RecvStream, Arc<ClientLink>)>,
    done: bool,
}

impl RemoteFrames {
    /// Subscribes again from where the stream was, on a new connection, trying
    /// for up to [`RESUBSCRIBE_WAIT_MS_MAX`] while the node is unreachable.
    async fn resume(&mut self) -> Result<(quinn::RecvStream, Arc<ClientLink>), ApiError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(RESUBSCRIBE_WAIT_MS_MAX);
        let mut delay = Duration::from_millis(RESUBSCRIBE_DELAY_MS_MIN);
        let request = ClientRequest::Subscribe {
            room: self.room,
            from: self.from,
        };
        loop {
            match self.node.open(&request).await {
                Ok(stream) => return Ok(stream),
                Err(ApiError::Denied(denial)) => return Err(ApiError::Denied(denial)),
                Err(error) if self.node.inner.closed.load(Ordering::SeqCst) => return Err(error),
                Err(error) if tokio::time::Instant::now() + delay > deadline => return Err(error),
                Err(_) => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(RESUBSCRIBE_DELAY_MS_MAX));
        }
    }

    /// What one read of the stream means.
    fn interpret(&mut self, response: Result<ClientResponse, ApiError>, link: &ClientLink) -> Read {
        let item = match response {
            Ok(ClientResponse::Frame { seq, frame }) => {
                // Subscription::next refuses a sequence with no next.
                self.from = Position::At(Seq(seq.0.saturating_add(1)));
                return Read::Item(Some(Ok((seq, *frame))));
            }
            // Where it starts: a `Live` subscription resumed before its first
            // frame resumes here, not at the node's present then.
            Ok(ClientResponse::Started { at }) if self.from == Position::Live => {
                self.from = Position::At(at);
                return Read::Again;
            }
            Ok(ClientResponse::Started { .. }) => return Read::Again,
            Ok(ClientResponse::Ended) => None,
            Ok(ClientResponse::Refused(denial)) => Some(Err(ApiError::Denied(denial))),
            Ok(other) => Some(Err(unexpected(other))),
            Err(_) if RemoteNode::died(link) => return Read::Resume,
            Err(e) => Some(Err(e)),
        };
        self.done = true;
        Read::Item(item)
    }
}

/// What one read of a subscription's stream means.
enum Read {
    /// A frame, an error, or (`None`) the end.
    Item(Option<Result<(Seq, Frame), ApiError>>),
    /// Nothing to return: read on.
    Again,
    /// The connection died: resume on a new one.
    Resume,
}

impl FrameSource for RemoteFrames {
    async fn next(&mut self) -> Option<Result<(Seq, Frame), ApiError>> {
        while !self.done {
            let (mut recv, link) = match self.stream.take() {
                Some(stream) => stream,
                None => match self.resume().await {
                    Ok(stream) => stream,
                    Err(error) => {
                        self.done = true;
                        return Some(Err(error));
                    }
                },
            };
            let response = RemoteNode::read(&link, &mut recv).await;
            match self.interpret(response, &link) {
                Read::Item(item) => {
                    self.stream = Some((recv, link));
                    return item;
                }
                Read::Again => self.stream = Some((recv, link)),
                Read::Resume => {
                    tracing::info!(room = ?self.room, "subscription's connection died: resuming");
                }
            }
        }
        None
    }
}
