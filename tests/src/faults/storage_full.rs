//! The coordinator's storage fills up during a push.
//!
//! `storage-full`: the coordinator's whole data directory (redb, tokens, blobs) is a
//! 16 MiB tmpfs. A small plugin is pushed, a filler file leaves about 4 MiB free, and an
//! 8 MiB plugin is pushed. The push must fail with `RESOURCE_EXHAUSTED` and a message
//! naming the plugin and the full storage; nothing of it may be visible or left behind
//! (not listed, no staging file, no unreferenced blob, the free space back to what it
//! was); after a restart redb opens and the earlier plugin downloads intact. Once the
//! filler is deleted the same push succeeds and downloads verified.
//!
//! Mounting needs root: without the permission the scenario reports itself skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use tonic::Code;

use super::{Outcome, Scenario};
use crate::{Conn, TestCoordinator, content, files_under};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("storage-full", || Box::pin(storage_full()))];

const MIB: u64 = 1 << 20;
const TMPFS_MIB: u64 = 16;
/// Free space left by the filler.
const LEFT_FREE: u64 = 4 * MIB;
const SMALL: usize = 512 * 1024;
const BIG: usize = 8 << 20;

/// A tmpfs mounted on a directory; lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `mib` MiB on `dir`. `Ok(None)`: not permitted (not root).
fn mount_tmpfs(dir: &Path, mib: u64) -> anyhow::Result<Option<Tmpfs>> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .output()
        .context("run mount(8)")?;
    if out.status.success() {
        return Ok(Some(Tmpfs(dir.to_owned())));
    }
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    if [
        "permission denied",
        "operation not permitted",
        "must be superuser",
        "only root",
    ]
    .iter()
    .any(|m| err.contains(m))
    {
        return Ok(None);
    }
    bail!("mount -t tmpfs on {} failed: {}", dir.display(), err.trim())
}

/// Bytes available to unprivileged writers on the filesystem of `dir` (`stat -f`).
fn available(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .context("run stat -f")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    match (f.next(), f.next()) {
        (Some(Ok(blocks)), Some(Ok(size))) => Ok(blocks * size),
        _ => bail!(
            "unexpected `stat -f` output for {}: {text:?}",
            dir.display()
        ),
    }
}

async fn listed(c: &Conn) -> anyhow::Result<Vec<pb::PluginVersion>> {
    Ok(c.plugins(&c.admin_token)
        .await
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .context("list plugins")?
        .into_inner()
        .plugins)
}

/// Nothing of a failed push is visible or left behind under the data directory.
async fn nothing_half_stored(c: &TestCoordinator, when: &str) -> anyhow::Result<()> {
    let plugins = listed(c).await?;
    ensure!(
        !plugins.iter().any(|p| p.plugin_id == "store/big"),
        "{when}: the failed push is listed: {plugins:?}"
    );
    let storage = c.storage();
    let staged = files_under(&storage.join("staging"));
    ensure!(staged.is_empty(), "{when}: staging files left: {staged:?}");
    let referenced: Vec<&str> = plugins.iter().map(|p| p.sha256.as_str()).collect();
    for blob in files_under(&storage.join("blobs")) {
        let name = blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ensure!(
            referenced.contains(&name.as_str()),
            "{when}: unreferenced (half-stored) blob {}",
            blob.display()
        );
    }
    let partial: Vec<PathBuf> = files_under(&c.config.data_dir)
        .into_iter()
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".part") || n.ends_with(".tmp")
        })
        .collect();
    ensure!(
        partial.is_empty(),
        "{when}: partial files left: {partial:?}"
    );
    Ok(())
}

async fn storage_full() -> anyhow::Result<Outcome> {
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir)?;
    // Declared before the coordinator: unmounted after it has stopped.
    let Some(_mount) = mount_tmpfs(&data_dir, TMPFS_MIB)? else {
        return Ok(Outcome {
            outcome: "skipped: mounting a tmpfs needs root".into(),
            ..Default::default()
        });
    };
    let mut c = TestCoordinator::start({
        let data_dir = data_dir.clone();
        move |cfg| cfg.data_dir = data_dir
    })
    .await;

    let small = content(SMALL, 1);
    c.push("store/small", "1.0.0", &small, Default::default())
        .await
        .context("push the small plugin")?;

    // Leave LEFT_FREE bytes: the big push cannot fit.
    let filler = data_dir.join("filler");
    let fill = available(&data_dir)?
        .checked_sub(LEFT_FREE)
        .context("the tmpfs has less free space than the scenario leaves")?;
    std::fs::write(&filler, vec![0u8; fill as usize]).context("write the filler")?;
    let free_before = available(&data_dir)?;

    let big = content(BIG, 2);
    let err = match c.push("store/big", "1.0.0", &big, Default::default()).await {
        Ok(_) => bail!(
            "an {} MiB push into {} MiB of free space succeeded",
            BIG as u64 / MIB,
            free_before / MIB
        ),
        Err(e) => e,
    };
    ensure!(
        err.code() == Code::ResourceExhausted,
        "a push into a full storage failed with {:?} instead of RESOURCE_EXHAUSTED: {}",
        err.code(),
        err.message()
    );
    let msg = err.message().to_string();
    ensure!(
        msg.contains("store/big@1.0.0") && msg.contains("storage is full"),
        "the storage-full error does not name the plugin and the full storage: {msg:?}"
    );

    nothing_half_stored(&c, "after the failed push").await?;
    let free_after = available(&data_dir)?;
    ensure!(
        free_after + 256 * 1024 >= free_before,
        "the failed push still holds {} KiB of storage",
        (free_before - free_after) / 1024
    );

    // redb opens after a restart, the earlier plugin is intact, the failed one absent.
    c.restart().await;
    nothing_half_stored(&c, "after the restart").await?;
    let agent = c.register("checker", &[], vec![]).await;
    let (_, bytes) = c
        .download(
            &agent,
            pb::DownloadPluginRequest {
                plugin_id: "store/small".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .context("download the earlier plugin after the failed push")?;
    ensure!(
        bytes == small,
        "the earlier plugin changed after the failed push"
    );

    // Free the space: the same push goes through.
    std::fs::remove_file(&filler)?;
    let pushed = c
        .push("store/big", "1.0.0", &big, Default::default())
        .await
        .context("the same push after freeing space")?
        .plugin
        .context("push answered without the plugin")?;
    ensure!(
        pushed.sha256 == ContentId::of_bytes(&big).to_hex(),
        "the re-pushed plugin has another SHA-256"
    );
    let fetched = c
        .fetch_verified(&agent, "store/big", "1.0.0")
        .await
        .context("download the re-pushed plugin")?;
    ensure!(fetched == BIG as u64, "downloaded {fetched} of {BIG} bytes");
    let plugins = listed(&c).await?;
    ensure!(
        plugins.len() == 2,
        "expected store/small and store/big, listed {plugins:?}"
    );
    if let Some(running) = c.running.take() {
        running.shutdown().await;
    }

    Ok(Outcome {
        outcome: format!(
            "{} MiB push into {} MiB free: {:?} \"{msg}\"; nothing stored; pushed after freeing space",
            BIG as u64 / MIB,
            free_before / MIB,
            err.code()
        ),
        server_bytes: SMALL as u64 + fetched,
        ..Default::default()
    })
}
