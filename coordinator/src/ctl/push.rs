//! `plugin push`: validate locally, hash the file in one streaming pass, then stream it
//! to `PluginAdmin.PushPlugin` in pieces of at most [`MAX_PIECE`] bytes.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};

use arcade_p2p::{ContentId, PluginRef};
use arcade_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::error::CtlError;
use super::output::{PluginJson, emit, emit_json};
use super::{Ctx, PushArgs, parse_labels};

/// Largest `data` message sent.
pub const MAX_PIECE: usize = 1 << 20;

fn io_error(what: &str, path: &Path, source: std::io::Error) -> CtlError {
    CtlError::Io {
        what: format!("cannot {what} {}", path.display()),
        source,
    }
}

/// A byte progress bar on stderr, hidden unless stderr is a terminal.
fn progress(len: u64, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message);
    bar
}

/// SHA-256 of a file, read in pieces on a blocking thread.
async fn hash_file(path: PathBuf, size: u64) -> Result<String, CtlError> {
    let bar = progress(size, "hashing");
    let b = bar.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(|e| io_error("open", &path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; MAX_PIECE];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("read", &path, e)),
            };
            hasher.update(&buf[..n]);
            b.inc(n as u64);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        Ok(ContentId::from_bytes(digest).to_hex())
    })
    .await
    .map_err(|e| CtlError::Output(format!("hashing task failed: {e}")))?;
    bar.finish_and_clear();
    result
}

/// Fills `buf` from `file` unless the end comes first; returns the bytes read.
async fn fill(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Sends the header, then the file in pieces. Stops early (without error) when the
/// call has ended, whose result then tells what happened.
async fn send_file(
    path: PathBuf,
    header: pb::PushPluginHeader,
    tx: tokio::sync::mpsc::Sender<pb::PushPluginRequest>,
    bar: ProgressBar,
) -> Result<(), CtlError> {
    use pb::push_plugin_request::Msg;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| io_error("open", &path, e))?;
    let first = pb::PushPluginRequest {
        msg: Some(Msg::Header(header)),
    };
    if tx.send(first).await.is_err() {
        return Ok(());
    }
    loop {
        let mut buf = vec![0u8; MAX_PIECE];
        let n = fill(&mut file, &mut buf)
            .await
            .map_err(|e| io_error("read", &path, e))?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        let msg = pb::PushPluginRequest {
            msg: Some(Msg::Data(buf)),
        };
        if tx.send(msg).await.is_err() {
            return Ok(());
        }
        bar.inc(n as u64);
    }
}

/// Runs `plugin push`.
pub(super) async fn push(ctx: &Ctx, args: PushArgs) -> Result<(), CtlError> {
    let r = PluginRef::new(&args.id, &args.version).map_err(|e| CtlError::Usage(e.to_string()))?;
    let allowed = parse_labels(&args.allowed_label, "--allowed-label")?;
    let expected = args
        .sha256
        .as_deref()
        .map(|h| {
            h.parse::<ContentId>()
                .map(|id| id.to_hex())
                .map_err(|e| CtlError::Usage(format!("--sha256: {e}")))
        })
        .transpose()?;
    let meta = std::fs::metadata(&args.file).map_err(|e| io_error("read", &args.file, e))?;
    if !meta.is_file() {
        return Err(CtlError::Usage(format!(
            "{} is not a regular file",
            args.file.display()
        )));
    }
    let conn = ctx.connect().await?;
    let sha256 = match expected {
        Some(h) => h,
        None => hash_file(args.file.clone(), meta.len()).await?,
    };
    let (signer, signature) = match &args.sign_key {
        Some(path) => {
            let key = arcade_p2p::publisher::PublisherKey::load(path)
                .map_err(|e| CtlError::Usage(format!("--sign-key: {e}")))?;
            let content: ContentId = sha256
                .parse()
                .map_err(|e| CtlError::Usage(format!("--sha256: {e}")))?;
            let statement = arcade_p2p::publisher::statement(
                r.id.as_str(),
                &r.version.to_string(),
                &content,
                meta.len(),
            );
            (key.id().as_bytes().to_vec(), key.sign(&statement))
        }
        None => (Vec::new(), Vec::new()),
    };
    let header = pb::PushPluginHeader {
        signer,
        signature,
        plugin_id: r.id.to_string(),
        version: r.version.to_string(),
        plugin_type: args.plugin_type.unwrap_or_default(),
        name: args.name.unwrap_or_default(),
        expected_sha256: sha256,
        allowed_labels: arcade_p2p::labels::to_proto(&allowed),
        description: args.description.unwrap_or_default(),
        cdc: args
            .chunking
            .0
            .as_ref()
            .map(arcade_p2p::manifest::cdc_to_proto),
    };

    let bar = progress(meta.len(), "uploading");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sender = send_file(args.file.clone(), header, tx, bar.clone());
    let mut client = conn.plugins();
    let call = client.push_plugin(ReceiverStream::new(rx));
    tokio::pin!(sender, call);
    // A read error aborts the call (the coordinator then stores nothing); an early
    // answer from the coordinator (a rejection) ends the upload.
    let outcome = tokio::select! {
        sent = &mut sender => match sent {
            Ok(()) => call.await,
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        },
        answer = &mut call => answer,
    };
    bar.finish_and_clear();
    let response = outcome.map_err(|s| conn.error(s))?.into_inner();
    let plugin = response
        .plugin
        .ok_or_else(|| CtlError::BadAnswer("PushPlugin returned no plugin record".into()))?;
    let plugin = PluginJson::from(plugin);
    if args.json {
        emit_json(&plugin)
    } else {
        emit(&format!(
            "{} {}@{} sha256={} size={} chunks={}",
            if response.created {
                "pushed"
            } else {
                "unchanged"
            },
            plugin.id,
            plugin.version,
            plugin.sha256,
            plugin.size,
            plugin.chunks
        ))
    }
}
