//! Preheat orders (an admin's `PluginAdmin.PreheatPlugin`, handed out in heartbeat
//! answers): fetch a plugin version in the background, the way a job would (the
//! coordinator's manifest and peer hints, the same fetcher, herd protection and
//! verification), and keep it pinned against eviction for the order's pin time.
//!
//! Each order is acted on once per preheat id; what happened goes back in the next
//! heartbeats as reports (`FETCHING`, then `DONE` with the bytes by source, or `FAILED`
//! with the reason). Orders for plugins this agent's `[trust]` refuses fail before any
//! byte is fetched. Pins live in memory: a restarted agent re-registers and the
//! coordinator tells it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arcade_p2p::PluginRef;
use arcade_p2p::publisher::TrustPolicy;
use arcade_proto::v1 as pb;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::{PinGuard, PluginCache};
use crate::fetch::Fetcher;
use crate::session::Session;

/// Most preheats remembered at once (the coordinator keeps at most 1024 active).
const MAX_KNOWN: usize = 1024;
/// Most reports sent in one heartbeat (the coordinator's limit).
const MAX_REPORTS: usize = 1024;

/// What a preheat fetch needs.
#[derive(Debug, Clone)]
pub(crate) struct PreheatContext {
    pub(crate) agent_id: String,
    pub(crate) session: Session,
    pub(crate) fetcher: Fetcher,
    pub(crate) cache: PluginCache,
    pub(crate) trust: TrustPolicy,
    /// Cancelled when the agent stops: fetches end, unreported.
    pub(crate) stop: CancellationToken,
}

struct Known {
    until: Instant,
    pin: Option<PinGuard>,
    /// The latest report: sent again if the coordinator orders this preheat again (it
    /// forgot our reports when we registered again).
    last: pb::PreheatReport,
}

#[derive(Default)]
struct State {
    /// Preheat id → its pin and when it ends.
    known: HashMap<String, Known>,
    /// Reports the coordinator has not accepted yet, oldest first.
    outbox: Vec<pb::PreheatReport>,
}

/// The agent's preheats. See the module doc.
pub(crate) struct Preheater {
    ctx: PreheatContext,
    state: Arc<Mutex<State>>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Preheater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preheater").finish_non_exhaustive()
    }
}

fn report(id: &str, state: pb::PreheatState, error: String) -> pb::PreheatReport {
    pb::PreheatReport {
        preheat_id: id.to_owned(),
        state: state as i32,
        error,
        ..Default::default()
    }
}

impl Preheater {
    pub(crate) fn new(ctx: PreheatContext) -> Self {
        Self {
            ctx,
            state: Arc::default(),
            tasks: Mutex::new(JoinSet::new()),
        }
    }

    /// Reports for the next heartbeat (give them back with [`Self::restore`] if it
    /// fails).
    pub(crate) fn take_reports(&self) -> Vec<pb::PreheatReport> {
        let mut state = self.state.lock().expect("preheat lock");
        let n = state.outbox.len().min(MAX_REPORTS);
        state.outbox.drain(..n).collect()
    }

    /// Puts back reports a failed heartbeat did not deliver, before newer ones.
    pub(crate) fn restore(&self, mut reports: Vec<pb::PreheatReport>) {
        if reports.is_empty() {
            return;
        }
        let mut state = self.state.lock().expect("preheat lock");
        reports.append(&mut state.outbox);
        state.outbox = reports;
    }

    /// Starts the orders not seen before; drops pins whose time is over.
    pub(crate) fn handle(&self, orders: Vec<pb::PreheatOrder>) {
        let now = Instant::now();
        let mut tasks = self.tasks.lock().expect("preheat tasks lock");
        while tasks.try_join_next().is_some() {}
        let mut state = self.state.lock().expect("preheat lock");
        state.known.retain(|_, k| k.until > now);
        for order in orders {
            let id = &order.preheat_id;
            if let Some(k) = state.known.get(id) {
                let last = k.last.clone();
                if !state.outbox.iter().any(|r| &r.preheat_id == id) {
                    state.outbox.push(last);
                }
                continue;
            }
            if state.known.len() >= MAX_KNOWN {
                continue;
            }
            let fetching = report(id, pb::PreheatState::Fetching, String::new());
            state.known.insert(
                id.clone(),
                Known {
                    until: now + Duration::from_secs(order.pin_seconds),
                    pin: None,
                    last: fetching.clone(),
                },
            );
            state.outbox.push(fetching);
            let ctx = self.ctx.clone();
            let shared = Arc::clone(&self.state);
            tasks.spawn(async move {
                let id = order.preheat_id.clone();
                let outcome = tokio::select! {
                    r = preheat(&ctx, &shared, &order) => r,
                    _ = ctx.stop.cancelled() => return,
                };
                let done = match outcome {
                    Ok(done) => done,
                    Err(error) => {
                        tracing::warn!(preheat = %id, plugin = %format!("{}@{}", order.plugin_id, order.version), %error, "preheat failed");
                        report(&id, pb::PreheatState::Failed, error)
                    }
                };
                let mut state = shared.lock().expect("preheat lock");
                if let Some(k) = state.known.get_mut(&id) {
                    k.last = done.clone();
                }
                state.outbox.push(done);
            });
        }
    }

    /// Waits for running preheat fetches to end (after the stop token is cancelled).
    pub(crate) async fn drain(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("preheat tasks lock"));
        while tasks.join_next().await.is_some() {}
    }
}

/// One order: manifest and hints from the coordinator, trust check, pin, fetch.
async fn preheat(
    ctx: &PreheatContext,
    state: &Mutex<State>,
    order: &pb::PreheatOrder,
) -> Result<pb::PreheatReport, String> {
    let plugin = PluginRef::new(&order.plugin_id, &order.version)
        .map_err(|e| format!("the order names an invalid plugin: {e}"))?;
    let req = pb::GetManifestRequest {
        agent_id: ctx.agent_id.clone(),
        plugin_id: order.plugin_id.clone(),
        version: order.version.clone(),
        ..Default::default()
    };
    let info = ctx
        .session
        .client()
        .get_manifest(req)
        .await
        .map_err(|s| format!("the coordinator refused its manifest: {}", s.message()))?
        .into_inner()
        .plugin
        .ok_or("the coordinator sent no plugin info")?;
    if info.checksum != order.sha256 {
        return Err(format!(
            "plugin {plugin} now has content {} instead of the ordered {}",
            info.checksum, order.sha256
        ));
    }
    crate::job::check_signature(&ctx.trust, &info)?;
    let pin = ctx.cache.pin(&plugin);
    if let Some(k) = state
        .lock()
        .expect("preheat lock")
        .known
        .get_mut(&order.preheat_id)
    {
        k.pin = Some(pin);
    }
    let fetched = ctx
        .fetcher
        .ensure(&info, &ctx.stop)
        .await
        .map_err(|e| e.to_string())?;
    let by = |k: &str| fetched.bytes_by_source.get(k).copied().unwrap_or(0);
    tracing::info!(
        preheat = %order.preheat_id,
        plugin = %plugin,
        cache_hit = fetched.cache_hit,
        bytes_from_peers = by("peer"),
        bytes_from_server = by("server"),
        pin_s = order.pin_seconds,
        "plugin preheated"
    );
    Ok(pb::PreheatReport {
        peer_bytes: by("peer"),
        coordinator_bytes: by("server"),
        ..report(&order.preheat_id, pb::PreheatState::Done, String::new())
    })
}
