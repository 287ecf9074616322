//! The `/arcade/have/1` protocol: announcements instead of polls, and cancels that reach
//! the holder.
//!
//! A requester opens one long-lived stream per holder and content (`HaveSubscribe`:
//! ticket, content, chunk count). The holder checks the ticket like a chunk request,
//! answers with its bitfield and then sends the chunks it verifies from then on
//! (`HaveUpdate.haves`), at most one message per [`BATCH_EVERY`] per stream, so new
//! chunks reach every interested peer in one message and nothing is polled. On the same
//! stream the requester sends cancels of its chunk requests (`HaveControl.cancel`): a
//! request still waiting at the holder (for its upload rate) is answered
//! `REFUSAL_CANCELLED` instead of with the chunk, and its reserved upload budget is given
//! back. Closing the stream cancels every waiting request of that requester for that
//! content.
//!
//! Pieces: [`Announcer`] (what a node verified, to every subscriber), [`Cancels`] (the
//! waiting chunk requests by requester, content and chunk), [`serve`] (one subscription,
//! holder side) and [`Watch`] (one subscription, requester side).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arcade_proto::v1 as pb;
use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::bitfield::Bitfield;
use super::protocol::{MAX_REQUEST_BYTES, read_message, write_frame};
use crate::ContentId;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/arcade/have/1");
/// A holder sends at most one update per stream this often (news in between are
/// batched into the next one).
pub const BATCH_EVERY: Duration = Duration::from_millis(20);
/// The subscription must arrive this soon after the stream opens.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most subscriptions one peer may hold to a host at once.
pub const MAX_SESSIONS_PER_PEER: usize = 64;
/// Most subscriptions a host serves at once.
pub const MAX_SESSIONS: usize = 8192;
/// News kept per content for slow subscribers; one that falls further behind is sent the
/// whole bitfield again.
const NEWS_BACKLOG: usize = 1024;
/// Largest control message (a cancel is a few bytes).
const MAX_CONTROL_BYTES: usize = 64;
/// Cancels queued per watch before the oldest are dropped (a cancel is advice).
const CANCEL_QUEUE: usize = 256;

/// The largest update for a content of `chunks` chunks: its bitfield, or a list of up to
/// every chunk index (5 bytes each), plus framing.
pub fn update_limit(chunks: u32) -> usize {
    (chunks as usize).saturating_mul(5).saturating_add(1024)
}

/// What a node verified, fanned out to the subscribers of each content.
#[derive(Debug, Default)]
pub struct Announcer {
    contents: Mutex<HashMap<ContentId, broadcast::Sender<u32>>>,
}

impl Announcer {
    /// Chunk `index` of `content` is verified and may be served.
    pub fn announce(&self, content: &ContentId, index: u32) {
        let contents = self.contents.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = contents.get(content) {
            let _ = tx.send(index);
        }
    }

    fn subscribe(&self, content: ContentId) -> broadcast::Receiver<u32> {
        let mut contents = self.contents.lock().unwrap_or_else(PoisonError::into_inner);
        contents
            .entry(content)
            .or_insert_with(|| broadcast::channel(NEWS_BACKLOG).0)
            .subscribe()
    }

    /// Forgets contents nobody listens to any more.
    fn prune(&self, content: &ContentId) {
        let mut contents = self.contents.lock().unwrap_or_else(PoisonError::into_inner);
        if contents
            .get(content)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            contents.remove(content);
        }
    }
}

type CancelKey = (PeerId, ContentId, u32);

/// The chunk requests waiting at this host, by requester, content and chunk.
#[derive(Debug, Default)]
pub struct Cancels {
    waiting: Mutex<HashMap<CancelKey, (u64, CancellationToken)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A waiting request's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Waiting {
    cancels: Arc<Cancels>,
    key: CancelKey,
    id: u64,
    /// Cancelled when the requester cancels.
    pub token: CancellationToken,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self
            .cancels
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A newer request for the same chunk may have replaced this one: keep that.
        if waiting.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            waiting.remove(&self.key);
        }
    }
}

impl Cancels {
    /// Registers `peer`'s request for chunk `index` of `content`.
    pub fn wait(self: &Arc<Self>, peer: PeerId, content: ContentId, index: u32) -> Waiting {
        let token = CancellationToken::new();
        let key = (peer, content, index);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (id, token.clone()));
        Waiting {
            cancels: self.clone(),
            key,
            id,
            token,
        }
    }

    /// Cancels `peer`'s waiting request for chunk `index` of `content`; true when one
    /// was waiting.
    pub fn cancel(&self, peer: PeerId, content: ContentId, index: u32) -> bool {
        let entry = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(peer, content, index));
        entry.map(|(_, token)| token.cancel()).is_some()
    }

    /// Cancels every waiting request of `peer` for `content`.
    pub fn cancel_all(&self, peer: PeerId, content: ContentId) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.retain(|(p, c, _), (_, token)| {
            let theirs = *p == peer && *c == content;
            if theirs {
                token.cancel();
            }
            !theirs
        });
    }
}

/// Admits a subscription: see [`Holder::admit`].
pub type Admit =
    Box<dyn Fn(&PeerId, &[u8], &[u8]) -> Result<(ContentId, i64), pb::Refused> + Send + Sync>;
/// Reads what is held: see [`Holder::held`].
pub type ReadHeld = Arc<dyn Fn(&ContentId) -> Option<Bitfield> + Send + Sync>;

/// What [`serve`] needs from the host.
pub struct Holder {
    /// Admits `peer`'s subscription (ticket and content bytes as sent): the content and
    /// when the ticket expires (unix ms), or the refusal to send.
    pub admit: Admit,
    /// The chunks of a content held now (blocking: may read the disk).
    pub held: ReadHeld,
    /// Told once a subscription is admitted.
    pub admitted: Box<dyn Fn(PeerId, ContentId) + Send + Sync>,
    /// News of this node's verified chunks.
    pub announcer: Arc<Announcer>,
    /// Waiting chunk requests.
    pub cancels: Arc<Cancels>,
}

fn update(kind: pb::have_update::Kind) -> pb::HaveUpdate {
    pb::HaveUpdate { kind: Some(kind) }
}

fn held_update(held: &Bitfield) -> pb::HaveUpdate {
    update(pb::have_update::Kind::Held(pb::HeldChunks {
        chunks: held.len(),
        bits: held.to_bytes(),
    }))
}

fn refusal_update(reason: pb::Refusal, message: impl Into<String>) -> pb::HaveUpdate {
    update(pb::have_update::Kind::Refused(pb::Refused {
        reason: reason as i32,
        message: message.into(),
    }))
}

/// Ends a subscription with `refusal` (the requester hears why), closing the stream.
async fn end<W: futures::AsyncWrite + Unpin>(
    wr: &mut W,
    refusal: pb::HaveUpdate,
) -> std::io::Result<()> {
    write_frame(wr, &refusal, update_limit(0)).await?;
    wr.close().await
}

/// Serves one subscription of `peer` on `stream` until either side closes it or the
/// requester's ticket expires.
pub async fn serve(holder: Holder, peer: PeerId, stream: Stream) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let sub: pb::HaveSubscribe =
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, read_message(&mut rd, MAX_REQUEST_BYTES))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no subscription in time")
            })??;
    let (content, expires_ms) = match (holder.admit)(&peer, &sub.ticket, &sub.content) {
        Ok(admitted) => admitted,
        Err(r) => return end(&mut wr, update(pb::have_update::Kind::Refused(r))).await,
    };
    // Subscribe before reading the bitfield: no chunk verified in between is missed.
    let mut news = holder.announcer.subscribe(content);
    let ended = serve_admitted(
        &holder, peer, content, sub.chunks, expires_ms, &mut news, rd, &mut wr,
    )
    .await;
    drop(news);
    holder.announcer.prune(&content);
    holder.cancels.cancel_all(peer, content);
    ended
}

#[allow(clippy::too_many_arguments)]
async fn serve_admitted(
    holder: &Holder,
    peer: PeerId,
    content: ContentId,
    chunks: u32,
    expires_ms: i64,
    news: &mut broadcast::Receiver<u32>,
    mut rd: futures::io::ReadHalf<Stream>,
    wr: &mut futures::io::WriteHalf<Stream>,
) -> std::io::Result<()> {
    let limit = update_limit(chunks);
    let read_held = || {
        let held = holder.held.clone();
        async move {
            tokio::task::spawn_blocking(move || held(&content))
                .await
                .ok()
                .flatten()
        }
    };
    let mut known = match read_held().await {
        Some(held) if held.len() == chunks => held,
        Some(held) => {
            let msg = format!(
                "content {content} has {} chunks here, not {chunks}",
                held.len()
            );
            return end(wr, refusal_update(pb::Refusal::BadRequest, msg)).await;
        }
        None => {
            let msg = format!("content {content} is not held here");
            return end(wr, refusal_update(pb::Refusal::UnknownContent, msg)).await;
        }
    };
    (holder.admitted)(peer, content);
    write_frame(wr, &held_update(&known), limit).await?;

    // Cancels are read by their own task (a read is not cancel-safe in a select).
    let closed = CancellationToken::new();
    let reader = {
        let (cancels, closed) = (holder.cancels.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok(msg) = read_message::<_, pb::HaveControl>(&mut rd, MAX_CONTROL_BYTES).await
            {
                if let Some(pb::have_control::Kind::Cancel(index)) = msg.kind {
                    cancels.cancel(peer, content, index);
                }
            }
            closed.cancel();
        })
    };
    let _reader = AbortOnDrop(reader.abort_handle());
    let until_expiry = Duration::from_millis(
        u64::try_from(expires_ms.saturating_sub(crate::now_ms())).unwrap_or(0),
    );
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    let mut last_sent = tokio::time::Instant::now();
    loop {
        if known.is_full() {
            // Nothing new can come: wait for the requester to close, or the expiry.
            tokio::select! {
                _ = closed.cancelled() => return Ok(()),
                _ = &mut expiry => break,
            }
        }
        let first = tokio::select! {
            _ = closed.cancelled() => return Ok(()),
            _ = &mut expiry => break,
            first = news.recv() => first,
        };
        let mut fresh = Vec::new();
        let mut resync = false;
        match first {
            Ok(i) => fresh.push(i),
            Err(broadcast::error::RecvError::Lagged(_)) => resync = true,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
        // Batch what arrives within the pacing window.
        let due = last_sent + BATCH_EVERY;
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        loop {
            match news.try_recv() {
                Ok(i) => fresh.push(i),
                Err(broadcast::error::TryRecvError::Lagged(_)) => resync = true,
                Err(_) => break,
            }
        }
        if resync {
            match read_held().await {
                Some(held) if held.len() == chunks => {
                    known = held;
                    write_frame(wr, &held_update(&known), limit).await?;
                }
                _ => break,
            }
        } else {
            fresh.retain(|&i| i < chunks && known.set(i));
            if !fresh.is_empty() {
                let list = pb::ChunkList { chunks: fresh };
                write_frame(wr, &update(pb::have_update::Kind::Haves(list)), limit).await?;
            }
        }
        last_sent = tokio::time::Instant::now();
    }
    let msg = "the requester's ticket expired: it must subscribe again with a fresh one";
    end(wr, refusal_update(pb::Refusal::NotVouched, msg)).await
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// News from a watched holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaveNews {
    /// Every chunk the holder has now.
    Held(Bitfield),
    /// Chunks the holder verified since its last news.
    Haves(Vec<u32>),
    /// The subscription ended (the holder refused or closed it, or the stream broke).
    Ended(String),
}

/// One subscription, requester side: news go to the sink given to
/// [`crate::mesh::host::MeshHandle::watch`]; [`Watch::cancel`] cancels a chunk request
/// at the holder. Dropping it closes the stream.
#[derive(Debug)]
pub struct Watch {
    cancels: mpsc::Sender<u32>,
    _tasks: [AbortOnDrop; 2],
}

impl Watch {
    /// Cancels this requester's request for chunk `index` at the holder (advice: a
    /// request already being sent arrives anyway).
    pub fn cancel(&self, index: u32) {
        let _ = self.cancels.try_send(index);
    }

    /// Subscribes on `stream` (just opened to `peer`) and forwards the holder's news to
    /// `sink` as `(peer, news)`.
    pub async fn start(
        stream: Stream,
        peer: PeerId,
        ticket: Vec<u8>,
        content: ContentId,
        chunks: u32,
        sink: mpsc::Sender<(PeerId, HaveNews)>,
    ) -> std::io::Result<Watch> {
        let (mut rd, mut wr) = stream.split();
        let sub = pb::HaveSubscribe {
            ticket,
            content: content.as_bytes().to_vec(),
            chunks,
        };
        write_frame(&mut wr, &sub, MAX_REQUEST_BYTES).await?;
        let (cancels, mut queued) = mpsc::channel::<u32>(CANCEL_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(index) = queued.recv().await {
                let msg = pb::HaveControl {
                    kind: Some(pb::have_control::Kind::Cancel(index)),
                };
                if write_frame(&mut wr, &msg, MAX_CONTROL_BYTES).await.is_err() {
                    break;
                }
            }
            let _ = wr.close().await;
        });
        let reader = tokio::spawn(async move {
            let limit = update_limit(chunks);
            let ended = loop {
                let news = match read_message::<_, pb::HaveUpdate>(&mut rd, limit).await {
                    Err(e) => break format!("stream ended: {e}"),
                    Ok(update) => match decode(update, chunks) {
                        Ok(news) => news,
                        Err(reason) => break reason,
                    },
                };
                let ended = matches!(news, HaveNews::Ended(_));
                if sink.send((peer, news)).await.is_err() || ended {
                    return;
                }
            };
            let _ = sink.send((peer, HaveNews::Ended(ended))).await;
        });
        Ok(Watch {
            cancels,
            _tasks: [
                AbortOnDrop(writer.abort_handle()),
                AbortOnDrop(reader.abort_handle()),
            ],
        })
    }
}

/// Checks one update against the manifest's chunk count.
fn decode(update: pb::HaveUpdate, chunks: u32) -> Result<HaveNews, String> {
    match update.kind {
        Some(pb::have_update::Kind::Held(h)) if h.chunks == chunks => {
            Bitfield::from_bytes(chunks, &h.bits)
                .map(HaveNews::Held)
                .map_err(|e| format!("bad bitfield: {e}"))
        }
        Some(pb::have_update::Kind::Held(h)) => Err(format!(
            "peer describes {} chunks, the manifest has {chunks}",
            h.chunks
        )),
        Some(pb::have_update::Kind::Haves(list)) => {
            match list.chunks.iter().find(|&&i| i >= chunks) {
                Some(i) => Err(format!("peer announces chunk {i} of {chunks}")),
                None => Ok(HaveNews::Haves(list.chunks)),
            }
        }
        Some(pb::have_update::Kind::Refused(r)) => Ok(HaveNews::Ended(format!(
            "peer refused ({:?}): {}",
            r.reason(),
            r.message
        ))),
        None => Err("empty update".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancels_reach_only_the_named_request() {
        let cancels = Arc::new(Cancels::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let content = ContentId::from_bytes([7; 32]);
        let w1 = cancels.wait(a, content, 1);
        let w2 = cancels.wait(a, content, 2);
        let w3 = cancels.wait(b, content, 1);
        assert!(cancels.cancel(a, content, 1));
        assert!(w1.token.is_cancelled());
        assert!(!w2.token.is_cancelled() && !w3.token.is_cancelled());
        assert!(!cancels.cancel(a, content, 1), "cancelled once");
        cancels.cancel_all(a, content);
        assert!(w2.token.is_cancelled() && !w3.token.is_cancelled());
        drop((w1, w2));
        drop(w3);
        assert!(cancels.waiting.lock().unwrap().is_empty());
    }

    #[test]
    fn updates_are_checked_against_the_manifest() {
        let held = Bitfield::full(10);
        assert_eq!(
            decode(held_update(&held), 10),
            Ok(HaveNews::Held(held.clone()))
        );
        assert!(decode(held_update(&held), 11).is_err());
        let haves = |v: Vec<u32>| update(pb::have_update::Kind::Haves(pb::ChunkList { chunks: v }));
        assert_eq!(
            decode(haves(vec![0, 9]), 10),
            Ok(HaveNews::Haves(vec![0, 9]))
        );
        assert!(decode(haves(vec![10]), 10).is_err());
        assert!(decode(pb::HaveUpdate { kind: None }, 10).is_err());
        assert!(matches!(
            decode(refusal_update(pb::Refusal::NotVouched, "x"), 10),
            Ok(HaveNews::Ended(_))
        ));
    }

    #[tokio::test]
    async fn announcements_reach_subscribers_and_unheard_contents_are_pruned() {
        let announcer = Announcer::default();
        let content = ContentId::from_bytes([1; 32]);
        announcer.announce(&content, 0); // nobody listens: dropped
        let mut rx = announcer.subscribe(content);
        announcer.announce(&content, 3);
        assert_eq!(rx.recv().await.unwrap(), 3);
        drop(rx);
        announcer.prune(&content);
        assert!(announcer.contents.lock().unwrap().is_empty());
    }
}
