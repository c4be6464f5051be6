//! Sessions between members over ractor_cluster, and their liveness.
//!
//! ractor_cluster notices only closed sockets, never reconnects, has no handshake
//! deadline and lets a client believe a connection with a wrong cookie succeeded. So:
//! - the member with the smaller name dials the other (one session per pair, no
//!   simultaneous-connect races), re-resolving the address on every attempt, with a
//!   backoff that doubles from `heartbeat` up to `reconnect_max`; members discovered
//!   later (their records, see [`super::lease`]) get a dialling task at the next
//!   heartbeat, and lose it when they leave the member list;
//! - a session from a member not known yet is admitted once the cookie check passed;
//! - every session must authenticate within `handshake_timeout` or it is closed;
//! - a session that closes before authenticating marks its peer `refused` with the
//!   reason, on both sides (the dialler knows whom it dialled; the listener learns the
//!   peer's name before the cookie check);
//! - every `heartbeat` each peer's gateway gets a timed `Ping`; `heartbeat_misses` misses
//!   in a row mark it `unresponsive` (a hung peer keeps its socket open), twice that many
//!   close its sessions here, so a socket that died without a FIN or RST (a silent
//!   network, a vanished host) is replaced by a redial instead of being kept forever;
//! - a peer's authenticated sessions are counted, so an old session closing after a new
//!   one authenticated leaves the peer up;
//! - when a peer's last session closes, its cluster and HTTP addresses are tried: when
//!   both refuse the connection twice in a row (its host answers and nothing listens
//!   there) the peer's process has *exited*, and the lease manager takes over its
//!   partitions without waiting for its leases to run out (ADR 017). A hung process
//!   (its listening sockets still accept), a cut link or a vanished host (no answer)
//!   does not refuse, so those wait for the lease. The mark goes when a session
//!   authenticates again or its HTTP address accepts a connection.
//!
//! ractor_cluster traffic is plain TCP and the cookie lets a peer run anything the
//! gateway offers: it belongs on a private network.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use ractor_cluster_derive::RactorMessage;
use std::sync::atomic::Ordering;

use super::gateway::{self, RemoteError};
use super::{Cluster, PeerState};
use crate::ctx::Ctx;

/// The registered name of the membership actor.
pub const NAME: &str = "membership";

/// The supervised actor that keeps this node's sessions: it runs the ractor_cluster node
/// server (linked: it dies with this actor), the dialling tasks (aborted with it) and,
/// every `heartbeat`, the liveness calls. A restart starts a new node server, whose
/// sessions the peers and the dialling tasks re-establish; the leases do not depend on
/// sessions, so a restart moves nothing.
pub struct Membership;

#[derive(RactorMessage)]
pub enum MembershipMsg {
    Liveness,
}

pub struct MembershipState {
    ctx: Arc<Ctx>,
    cluster: Arc<Cluster>,
    sessions: Sessions,
    server: ActorRef<NodeServerMessage>,
    /// One dialling task per known member with a greater name (aborted with the actor,
    /// or when the member leaves the member list).
    dialling: HashMap<String, super::lease::AbortOnDrop>,
}

impl MembershipState {
    /// Dialling tasks for the members this node dials (greater names), as the member
    /// list now stands: started for members new to it, stopped for members gone.
    fn dial_members(&mut self) {
        let known = self.cluster.member_names();
        self.dialling.retain(|name, _| known.contains(name));
        for name in known.into_iter().filter(|n| *n > self.cluster.me) {
            if !self.dialling.contains_key(&name) {
                let task = tokio::spawn(dial(
                    self.cluster.clone(),
                    self.server.clone(),
                    name.clone(),
                ));
                self.dialling.insert(name, super::lease::AbortOnDrop(task));
            }
        }
    }
}

#[derive(Debug, Clone)]
struct SessionInfo {
    authenticated: bool,
    name: Option<String>,
    addr: String,
    actor: ActorCell,
}

/// Open sessions by their actor (shared by the event subscription and the liveness loop).
type Sessions = Arc<Mutex<HashMap<ActorId, SessionInfo>>>;

/// Node events from the node server, turned into peer states. Events of a node server
/// an earlier incarnation of the membership actor started are ignored.
struct Events {
    cluster: Arc<Cluster>,
    sessions: Sessions,
    incarnation: u64,
}

impl Events {
    fn current(&self) -> bool {
        self.cluster.membership_incarnation.load(Ordering::Relaxed) == self.incarnation
    }
}

/// The member name of a session's peer (ractor_cluster names nodes `name@host`).
fn peer_name(ses: &NodeServerSessionInformation) -> Option<String> {
    ses.peer_name
        .as_ref()
        .map(|n| n.name.split('@').next().unwrap_or_default().to_string())
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if !self.current() {
            return;
        }
        let id = ses.actor.get_id();
        self.sessions.lock().insert(
            id,
            SessionInfo {
                authenticated: false,
                name: peer_name(&ses),
                addr: ses.peer_addr.clone(),
                actor: ses.actor.get_cell(),
            },
        );
        // ractor_cluster holds a session that never authenticates forever: close it.
        let sessions = self.sessions.clone();
        let cluster = self.cluster.clone();
        let deadline = self.cluster.settings.handshake_timeout;
        let actor = ses.actor.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let info = sessions.lock().get(&id).cloned();
            if let Some(info) = info.filter(|i| !i.authenticated) {
                let who = info.name.clone().unwrap_or_else(|| info.addr.clone());
                tracing::warn!(peer = %who, "cluster session not authenticated within {deadline:?}; closed");
                if let Some(n) = &info.name {
                    if let Some(p) = cluster.peers.lock().get_mut(n) {
                        p.last_error = Some(format!(
                            "handshake not completed within {} ms",
                            deadline.as_millis()
                        ));
                    }
                }
                actor.stop(Some("handshake timeout".into()));
            }
        });
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if !self.current() {
            return;
        }
        let id = ses.actor.get_id();
        let name = peer_name(&ses);
        let Some(name) = name else { return };
        if name.starts_with(troupe_client::CLIENT_PREFIX) {
            // A client program: admitted, never a member. It owns nothing, is never
            // called, and the only actors it sees here are the gateways.
            if let Some(i) = self.sessions.lock().get_mut(&id) {
                i.authenticated = true;
                i.name = Some(name.clone());
            }
            tracing::info!(client = %name, addr = %ses.peer_addr, "client session authenticated");
            return;
        }
        let mut peers = self.cluster.peers.lock();
        match peers.get_mut(&name) {
            Some(p) => {
                // Counted once per session (the event could repeat for one session).
                let mut open = self.sessions.lock();
                let first = match open.get_mut(&id) {
                    Some(i) => {
                        let first = !i.authenticated;
                        i.authenticated = true;
                        i.name = Some(name.clone());
                        first
                    }
                    None => {
                        open.insert(
                            id,
                            SessionInfo {
                                authenticated: true,
                                name: Some(name.clone()),
                                addr: ses.peer_addr.clone(),
                                actor: ses.actor.get_cell(),
                            },
                        );
                        true
                    }
                };
                drop(open);
                if !first {
                    return;
                }
                super::gateway::member_session_opened(&name, ses.node_id);
                if p.state != PeerState::Connecting {
                    p.reconnects += 1;
                }
                p.sessions += 1;
                p.misses = 0;
                p.last_error = None;
                p.exited = None;
                tracing::info!(peer = %name, "cluster session authenticated");
            }
            None => {
                // A member this node does not know yet (not configured here, its record
                // not read yet): the cookie admitted it. It becomes a peer now; its
                // addresses come with its record.
                peers.insert(name.clone(), super::Peer::new());
                drop(peers);
                tracing::info!(peer = %name, addr = %ses.peer_addr, "session from a member not known yet; admitted");
                self.node_session_authenticated(ses);
            }
        }
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if !self.current() {
            return;
        }
        let id = ses.actor.get_id();
        super::gateway::session_closed(ses.node_id);
        let info = self.sessions.lock().remove(&id);
        let name = info
            .as_ref()
            .and_then(|i| i.name.clone())
            .or_else(|| peer_name(&ses));
        let authenticated = info.as_ref().is_some_and(|i| i.authenticated);
        let Some(name) = name else {
            tracing::warn!(addr = %ses.peer_addr, "a cluster session closed before the peer named itself (not a Troupe node, or a cookie mismatch)");
            return;
        };
        let mut peers = self.cluster.peers.lock();
        let Some(p) = peers.get_mut(&name) else {
            return;
        };
        if authenticated {
            p.sessions = p.sessions.saturating_sub(1);
            if p.sessions > 0 {
                tracing::info!(peer = %name, open = p.sessions, "an older cluster session closed");
                return;
            }
            if self.cluster.member(&name).is_none() {
                // Admitted by its session only: nothing to dial it by.
                peers.remove(&name);
                tracing::info!(peer = %name, "session of a member not in the member list closed");
                return;
            }
            p.set(PeerState::Down);
            p.misses = 0;
            p.last_error = Some("session closed".into());
            tracing::warn!(peer = %name, "cluster session closed");
            if self.cluster.settings.takeover_on_exit && p.exited.is_none() {
                tokio::spawn(watch_exit(self.cluster.clone(), name));
            }
        } else {
            p.set(PeerState::Refused);
            p.last_error = Some(
                "handshake failed: the cookies differ (or the peer refused the session)".into(),
            );
            tracing::warn!(peer = %name, "cluster handshake failed: the cookies differ (or the peer refused the session)");
        }
    }

    fn node_session_ready(&self, _ses: NodeServerSessionInformation) {}
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = Arc<Ctx>;

    /// Starts the node server and the dialling tasks; schedules the liveness calls.
    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<MembershipState, ActorProcessingErr> {
        let cluster = ctx
            .cluster
            .clone()
            .ok_or("membership runs in cluster mode only")?;
        let incarnation = cluster
            .membership_incarnation
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // Whatever an earlier incarnation counted died with its node server.
        for p in cluster.peers.lock().values_mut() {
            p.sessions = 0;
            p.misses = 0;
            if matches!(p.state, PeerState::Up | PeerState::Unresponsive) {
                p.set(PeerState::Down);
            }
        }
        let s = &cluster.settings;
        let me = cluster
            .member(&cluster.me)
            .ok_or_else(|| format!("node {} is not among cluster.members", cluster.me))?;
        let (host, port) = me
            .cluster_addr
            .rsplit_once(':')
            .ok_or_else(|| format!("cluster_addr `{}` is not host:port", me.cluster_addr))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("cluster_addr `{}`: bad port", me.cluster_addr))?;
        let ip = tokio::net::lookup_host(&me.cluster_addr)
            .await
            .map_err(|e| format!("resolving {}: {e}", me.cluster_addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", me.cluster_addr))?
            .ip();
        let server = NodeServer::new(
            port,
            s.cookie.clone(),
            cluster.me.clone(),
            host.to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(ip);
        let (server, _) = Actor::spawn_linked(None, server, (), myself.get_cell())
            .await
            .map_err(|e| {
                format!(
                    "starting the cluster node server on {}: {e}",
                    me.cluster_addr
                )
            })?;
        let sessions: Sessions = Default::default();
        // A new node server numbers its sessions afresh.
        super::gateway::forget_sessions();
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "troupe.membership".into(),
                subscription: Box::new(Events {
                    cluster: cluster.clone(),
                    sessions: sessions.clone(),
                    incarnation,
                }),
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(addr = %me.cluster_addr, members = s.members.len(), incarnation, "cluster node server listening");
        myself.send_after(s.heartbeat, || MembershipMsg::Liveness);
        let mut st = MembershipState {
            ctx,
            cluster,
            sessions,
            server,
            dialling: HashMap::new(),
        };
        st.dial_members();
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<MembershipMsg>,
        _: MembershipMsg,
        st: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        crate::faults::fire(&st.ctx.faults, "membership").await?;
        let started = Instant::now();
        st.dial_members();
        liveness(&st.cluster, &st.sessions).await;
        // One round per heartbeat, however long the calls took (at most a heartbeat).
        let next = st
            .cluster
            .settings
            .heartbeat
            .saturating_sub(started.elapsed());
        myself.send_after(next, || MembershipMsg::Liveness);
        Ok(())
    }
}

/// Keeps a session to `peer` open while it is in the member list: dials when there is
/// none, waits for it to authenticate, backs off after failures.
async fn dial(cluster: Arc<Cluster>, server: ActorRef<NodeServerMessage>, peer: String) {
    let s = &cluster.settings;
    let mut backoff = s.heartbeat;
    loop {
        // Its address as the member list has it now (a discovered member's follows its
        // record); gone from the list: nothing more to dial.
        let Some(addr) = cluster.member(&peer).map(|m| m.cluster_addr) else {
            return;
        };
        let connected = cluster
            .peers
            .lock()
            .get(&peer)
            .is_some_and(|p| p.sessions > 0);
        if connected {
            tokio::time::sleep(s.heartbeat).await;
            continue;
        }
        let outcome = async {
            let target = tokio::net::lookup_host(&addr)
                .await
                .map_err(|e| format!("resolving {addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr} resolves to no address"))?;
            tokio::time::timeout(
                s.handshake_timeout,
                ractor_cluster::client_connect(&server, target),
            )
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
            let deadline = Instant::now() + s.handshake_timeout;
            while Instant::now() < deadline {
                let p = cluster.peers.lock().get(&peer).cloned();
                match p {
                    Some(p) if p.sessions > 0 => return Ok(()),
                    Some(p) if p.state == PeerState::Refused && p.since.elapsed() < s.heartbeat => {
                        return Err(p.last_error.unwrap_or_default())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            Err(format!(
                "no authenticated session within {} ms",
                s.handshake_timeout.as_millis()
            ))
        }
        .await;
        match outcome {
            Ok(()) => backoff = s.heartbeat,
            Err(why) => {
                if let Some(p) = cluster.peers.lock().get_mut(&peer) {
                    if p.state == PeerState::Up || p.state == PeerState::Unresponsive {
                        p.set(PeerState::Down);
                    }
                    if p.state != PeerState::Refused {
                        p.last_error = Some(why.clone());
                    }
                }
                tracing::debug!(peer = %peer, error = %why, "cluster dial failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(s.reconnect_max);
            }
        }
    }
}

/// A timed `Ping` to every peer with a session; a peer that missed
/// `2 * heartbeat_misses` in a row has its sessions closed.
async fn liveness(cluster: &Arc<Cluster>, sessions: &Sessions) {
    let s = cluster.settings.clone();
    {
        let peers: Vec<String> = cluster
            .peers
            .lock()
            .iter()
            .filter(|(_, p)| p.sessions > 0)
            .map(|(n, _)| n.clone())
            .collect();
        let pings = peers.iter().map(|peer| {
            let me = cluster.me.clone();
            let timeout = s.heartbeat;
            async move { (peer, gateway::ping(&me, peer, timeout).await) }
        });
        for (peer, r) in futures_util::future::join_all(pings).await {
            let mut all = cluster.peers.lock();
            let Some(p) = all.get_mut(peer) else { continue };
            match r {
                Ok(_) => {
                    p.last_ok = Some(Instant::now());
                    p.misses = 0;
                    p.set(PeerState::Up);
                }
                Err(RemoteError::Version { got, accepted }) => {
                    p.set(PeerState::Incompatible);
                    p.last_error = Some(format!(
                        "peer speaks cluster protocol {got}; this node accepts {}..={}",
                        accepted.0, accepted.1
                    ));
                }
                Err(e) => {
                    p.misses += 1;
                    if p.misses >= s.heartbeat_misses && p.state == PeerState::Up {
                        tracing::warn!(peer = %peer, misses = p.misses, error = %e, "peer unresponsive");
                        p.set(PeerState::Unresponsive);
                        p.last_error = Some(e.to_string());
                    }
                    if p.misses >= 2 * s.heartbeat_misses {
                        // The socket may be dead without anyone having been told: close
                        // it here, so the dialler replaces it when the peer answers again.
                        tracing::warn!(peer = %peer, misses = p.misses, "closing the sessions of an unresponsive peer");
                        p.misses = 0;
                        p.last_error = Some(format!(
                            "{} liveness calls unanswered; session closed",
                            2 * s.heartbeat_misses
                        ));
                        for i in sessions.lock().values() {
                            if i.name.as_deref() == Some(peer.as_str()) {
                                i.actor.stop(Some("peer unresponsive".into()));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether a TCP connection to `addr` is refused now: its host answered and nothing
/// listens there. A timeout, an unreachable host or a name that does not resolve is not
/// a refusal.
async fn refuses(addr: &str, limit: Duration) -> bool {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// Pause between the rounds of tries that establish an exit, and how many rounds.
const EXIT_RECHECK: Duration = Duration::from_millis(100);
const EXIT_TRIES: usize = 10;

/// After `peer`'s last session closed: marks it exited when its cluster and HTTP
/// addresses both refuse connections in two rounds of tries in a row, wakes the lease manager,
/// then watches the HTTP address (the cluster address of a successor would see a stray
/// session) every heartbeat until it accepts or a session authenticates again.
async fn watch_exit(cluster: Arc<Cluster>, peer: String) {
    let Some(m) = cluster.member(&peer) else {
        return;
    };
    let limit = cluster.settings.heartbeat;
    let addrs: Vec<String> = [m.cluster_addr.clone(), m.http_addr.clone()]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect();
    // Two rounds in a row with every address refusing, within the first second (a
    // process's sockets do not all close at the same instant).
    let mut refusing = 0;
    for round in 0..EXIT_TRIES {
        if round > 0 {
            tokio::time::sleep(EXIT_RECHECK).await;
        }
        let mut all = true;
        for a in &addrs {
            if !refuses(a, limit).await {
                tracing::debug!(peer = %peer, addr = %a, "member address does not refuse connections");
                all = false;
                break;
            }
        }
        refusing = if all { refusing + 1 } else { 0 };
        if refusing == 2 {
            break;
        }
    }
    if refusing < 2 {
        tracing::info!(peer = %peer, "member session closed but its addresses do not refuse connections (hung, cut off or restarting): its leases run their course");
        return;
    }
    {
        let mut peers = cluster.peers.lock();
        let Some(p) = peers.get_mut(&peer) else {
            return;
        };
        if p.sessions > 0 || p.exited.is_some() {
            return;
        }
        p.exited = Some(Instant::now());
        p.last_error = Some(format!(
            "process exited: session closed and {} refuse connections",
            addrs.join(" and ")
        ));
    }
    tracing::warn!(peer = %peer, "member process exited (session closed, its addresses refuse connections): its partitions are taken over without waiting for the lease");
    cluster.wake.notify_one();
    let watch = if m.http_addr.is_empty() {
        m.cluster_addr
    } else {
        m.http_addr
    };
    loop {
        tokio::time::sleep(cluster.settings.heartbeat).await;
        let still = cluster.peers.lock().get_mut(&peer).is_some_and(|p| {
            if p.sessions > 0 {
                p.exited = None;
            }
            p.exited.is_some()
        });
        if !still {
            return;
        }
        if !refuses(&watch, limit).await {
            if let Some(p) = cluster.peers.lock().get_mut(&peer) {
                p.exited = None;
            }
            tracing::info!(peer = %peer, addr = %watch, "member address accepts connections again");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_refuses_and_a_listening_or_paused_one_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let limit = Duration::from_secs(1);
        // Listening but never accepting (a paused process): the kernel still completes
        // the connection.
        assert!(!refuses(&addr, limit).await);
        drop(listener);
        assert!(refuses(&addr, limit).await);
        // A name that does not resolve is not a refusal.
        assert!(!refuses("no-such-host.invalid:7100", limit).await);
    }
}
