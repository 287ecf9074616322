use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

const CS: u32 = 1024;

/// A wall clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn new(start: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start)))
    }
    fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

fn opts(max_size: u64, eviction: EvictionPolicy, ttl: Option<Duration>) -> CacheOptions {
    CacheOptions {
        max_size,
        eviction,
        ttl,
        watermarks: Watermarks::default(),
    }
}

fn roomy() -> CacheOptions {
    opts(1 << 30, EvictionPolicy::Lru, None)
}

fn open_at(dir: &Path, o: CacheOptions, clock: &TestClock) -> PluginCache {
    let c = clock.clone();
    PluginCache::open_with_clock(dir, o, move || c.0.load(Ordering::SeqCst)).unwrap()
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) as u8).wrapping_add(seed))
        .collect()
}

fn pref(s: &str) -> PluginRef {
    s.parse().unwrap()
}

/// Writes `data` as the finished partial download and returns its manifest.
fn stage(cache: &PluginCache, data: &[u8]) -> Manifest {
    let m = Manifest::from_reader(data, CS).unwrap();
    fs::write(cache.partial_path(&m.content_id()), data).unwrap();
    m
}

fn download(cache: &PluginCache, plugin: &str, data: &[u8]) -> CachedPlugin {
    let m = stage(cache, data);
    cache.publish(&pref(plugin), &m).unwrap()
}

fn keys(v: &[EvictedEntry]) -> Vec<String> {
    v.iter().map(|e| e.plugin.key()).collect()
}

fn installed_keys(cache: &PluginCache) -> Vec<String> {
    cache
        .installed()
        .unwrap()
        .iter()
        .map(|p| p.plugin.key())
        .collect()
}

fn entry(cache: &PluginCache, key: &str) -> Option<Entry> {
    cache.inner.index.entry(key).unwrap()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    mode_of(&fs::metadata(path).unwrap()) & 0o777
}

#[test]
fn error_stays_small() {
    assert!(
        std::mem::size_of::<CacheError>() <= 128,
        "{}",
        std::mem::size_of::<CacheError>()
    );
}

#[test]
fn handle_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<PluginCache>();
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PinGuard>();
    send_sync::<CacheError>();
}

#[test]
fn eviction_policy_serde_names() {
    for (p, s) in [
        (EvictionPolicy::Lru, "\"lru\""),
        (EvictionPolicy::Lfu, "\"lfu\""),
        (EvictionPolicy::Fifo, "\"fifo\""),
    ] {
        assert_eq!(serde_json::to_string(&p).unwrap(), s);
        assert_eq!(serde_json::from_str::<EvictionPolicy>(s).unwrap(), p);
    }
    assert_eq!(EvictionPolicy::default(), EvictionPolicy::Lru);
    assert!(serde_json::from_str::<EvictionPolicy>("\"LRU\"").is_err());
}

#[test]
fn open_creates_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("plugins");
    let cache = PluginCache::open(&root, roomy()).unwrap();
    for d in ["builtin", "downloaded", "temp"] {
        assert!(root.join(d).is_dir(), "{d}");
    }
    assert!(root.join("index.redb").is_file());
    assert_eq!(cache.dir(), root);
    assert_eq!(cache.stats().unwrap(), CacheStats::default());
}

#[test]
fn publish_boundary_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), roomy(), &clock);
    let cs = CS as usize;
    let mut total = 0u64;
    for (n, len) in [0, 1, cs - 1, cs, cs + 1, 5 * cs + 3]
        .into_iter()
        .enumerate()
    {
        let data = content(len, n as u8);
        let m = Manifest::from_reader(&data[..], CS).unwrap();
        let sha = m.content_id();
        // Empty content: no download ever writes a partial; publish creates it.
        if len > 0 {
            fs::write(cache.partial_path(&sha), &data).unwrap();
            cache.save_progress(&sha, &[0]).unwrap();
        }
        let plugin = pref(&format!("test/p{n}@1.0.0"));
        let got = cache.publish(&plugin, &m).unwrap();
        assert_eq!(got.sha256, sha);
        assert_eq!(got.size, len as u64);
        assert!(!got.builtin);
        assert_eq!(got.path, tmp.path().join("downloaded").join(sha.to_hex()));
        assert_eq!(fs::read(&got.path).unwrap(), data);
        #[cfg(unix)]
        assert_eq!(mode(&got.path), 0o555, "read-only and executable");
        assert!(!cache.partial_path(&sha).exists(), "partial left behind");
        assert!(
            cache.load_progress(&sha).unwrap().is_empty(),
            "progress left"
        );
        let hit = cache
            .get(&plugin, &sha)
            .unwrap()
            .expect("hit after publish");
        assert_eq!(hit.path, got.path);
        total += len as u64;
    }
    assert_eq!(
        cache.stats().unwrap(),
        CacheStats {
            downloaded_bytes: total,
            entries: 6,
            evicted_by_size: 0,
            evicted_by_ttl: 0,
        }
    );
}

#[test]
fn publish_rejects_wrong_content_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let data = content(3 * CS as usize + 5, 1);
    let m = Manifest::from_reader(&data[..], CS).unwrap();
    let sha = m.content_id();
    let plugin = pref("test/bad@1.0.0");

    // Same length, one flipped byte: SHA-256 mismatch.
    let mut wrong = data.clone();
    wrong[2000] ^= 0xff;
    fs::write(cache.partial_path(&sha), &wrong).unwrap();
    cache.save_progress(&sha, &[0, 1, 2, 3]).unwrap();
    let err = cache.publish(&plugin, &m).unwrap_err();
    assert!(
        matches!(&err, CacheError::Verify { source, .. } if matches!(**source, VerifyError::Sha256 { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("test/bad@1.0.0"), "{err}");
    assert!(!cache.partial_path(&sha).exists());
    assert!(cache.load_progress(&sha).unwrap().is_empty());
    assert!(!tmp.path().join("downloaded").join(sha.to_hex()).exists());
    assert!(cache.get(&plugin, &sha).unwrap().is_none());

    // Too short: size mismatch.
    fs::write(cache.partial_path(&sha), &data[..100]).unwrap();
    let err = cache.publish(&plugin, &m).unwrap_err();
    assert!(
        matches!(&err, CacheError::Verify { source, .. } if matches!(**source, VerifyError::Size { .. })),
        "{err:?}"
    );
    assert!(!cache.partial_path(&sha).exists());

    // Nothing downloaded at all.
    let err = cache.publish(&plugin, &m).unwrap_err();
    assert!(matches!(err, CacheError::MissingPartial { .. }), "{err:?}");
    assert_eq!(cache.stats().unwrap(), CacheStats::default());
}

#[test]
fn get_hit_miss_and_stale_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), roomy(), &clock);
    let plugin = pref("notify/slack@1.0.0");
    let data = content(5000, 3);
    let sha = ContentId::of_bytes(&data);

    assert!(
        cache.get(&plugin, &sha).unwrap().is_none(),
        "miss on empty cache"
    );
    download(&cache, "notify/slack@1.0.0", &data);
    assert_eq!(entry(&cache, "notify/slack@1.0.0").unwrap().use_count, 1);

    clock.set(5_000);
    let hit = cache.get(&plugin, &sha).unwrap().unwrap();
    assert_eq!(hit.size, 5000);
    let e = entry(&cache, "notify/slack@1.0.0").unwrap();
    assert_eq!(
        (e.use_count, e.last_used_ms, e.inserted_ms),
        (2, 5_000, 1_000)
    );

    // Another digest for the same version is a miss (and does not disturb the entry).
    let other = ContentId::of_bytes(b"other");
    assert!(cache.get(&plugin, &other).unwrap().is_none());
    assert!(entry(&cache, "notify/slack@1.0.0").is_some());

    // The file vanished behind the cache's back: the stale entry is dropped.
    fs::remove_file(&hit.path).unwrap();
    assert!(cache.get(&plugin, &sha).unwrap().is_none());
    assert!(entry(&cache, "notify/slack@1.0.0").is_none());
    assert!(cache.installed().unwrap().is_empty());
}

#[cfg(unix)]
#[test]
fn builtin_registration_and_path_rules() {
    use std::os::unix::fs::PermissionsExt;

    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), opts(0, EvictionPolicy::Lru, None), &clock);
    let builtin = tmp.path().join("builtin");
    fs::create_dir_all(builtin.join("tools")).unwrap();
    let script = b"#!/bin/sh\necho builtin\n";
    let file = builtin.join("tools/echo.sh");
    fs::write(&file, script).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();

    let plugin = pref("tools/echo@1.0.0");
    let got = cache.register_builtin(&plugin, "tools/echo.sh").unwrap();
    assert!(got.builtin);
    assert_eq!(got.path, file);
    assert_eq!(got.sha256, ContentId::of_bytes(script));
    assert_eq!(got.size, script.len() as u64);
    assert_eq!(mode(&file), 0o755, "made executable");
    assert_eq!(installed_keys(&cache), vec!["tools/echo@1.0.0"]);
    assert!(cache.installed().unwrap()[0].builtin);

    let hit = cache.get(&plugin, &got.sha256).unwrap().unwrap();
    assert!(hit.builtin);
    assert_eq!(hit.path, file);
    assert!(
        cache
            .get(&plugin, &ContentId::of_bytes(b"x"))
            .unwrap()
            .is_none()
    );

    // Never evicted, even with max_size 0 and an expired TTL.
    clock.set(10_000_000);
    assert!(cache.evict().unwrap().is_empty());
    assert_eq!(installed_keys(&cache), vec!["tools/echo@1.0.0"]);

    // Path rules.
    let outside = tmp.path().join("outside.sh");
    fs::write(&outside, b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink(&outside, builtin.join("link.sh")).unwrap();
    for bad in [
        "",
        "/etc/passwd",
        "../outside.sh",
        "tools/../../outside.sh",
        "tools/..",
        ".",
        "link.sh",
        "tools",
    ] {
        let err = cache.register_builtin(&plugin, bad).unwrap_err();
        assert!(
            matches!(err, CacheError::BuiltinPath { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    let err = cache.register_builtin(&plugin, "missing.sh").unwrap_err();
    assert!(matches!(err, CacheError::Io { .. }), "{err:?}");
    // A symlink that stays inside builtin/ is fine.
    std::os::unix::fs::symlink(&file, builtin.join("alias.sh")).unwrap();
    let alias = cache
        .register_builtin(&pref("tools/alias@1.0.0"), "./alias.sh")
        .unwrap();
    assert_eq!(alias.sha256, got.sha256);
}

#[cfg(unix)]
#[test]
fn builtins_wait_for_re_registration_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = pref("tools/echo@1.0.0");
    let file = tmp.path().join("builtin/echo.sh");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(&file, b"#!/bin/sh\necho 1\n").unwrap();
    {
        let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
        cache.register_builtin(&plugin, "echo.sh").unwrap();
    }
    // Changed while the agent was down: not served until registered (and re-hashed) again.
    fs::write(&file, b"#!/bin/sh\necho 2\n").unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    assert!(cache.installed().unwrap().is_empty());
    let old = ContentId::of_bytes(b"#!/bin/sh\necho 1\n");
    assert!(cache.get(&plugin, &old).unwrap().is_none());
    let again = cache.register_builtin(&plugin, "echo.sh").unwrap();
    assert_eq!(again.sha256, ContentId::of_bytes(b"#!/bin/sh\necho 2\n"));
    assert!(cache.get(&plugin, &again.sha256).unwrap().is_some());
}

/// a: oldest insert; b: fewest uses; c: oldest last use. Publishing d (4 × S, max 3 × S)
/// evicts exactly one of them, chosen by the policy; returns its key.
fn policy_victim(policy: EvictionPolicy) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1);
    let s = 2 * CS as usize;
    let cache = open_at(tmp.path(), opts(3 * s as u64, policy, None), &clock);
    let names = ["p/a@1.0.0", "p/b@1.0.0", "p/c@1.0.0", "p/d@1.0.0"];
    let data: Vec<Vec<u8>> = (0..4).map(|i| content(s, 10 + i)).collect();
    let sha = |i: usize| ContentId::of_bytes(&data[i]);
    let use_at = |i: usize, t: u64| {
        clock.set(t);
        cache.get(&pref(names[i]), &sha(i)).unwrap().unwrap();
    };
    download(&cache, names[0], &data[0]); // a: inserted 1
    clock.set(3);
    download(&cache, names[2], &data[2]); // c: inserted 3
    use_at(2, 11);
    use_at(2, 12); // c: 3 uses, last 12
    clock.set(15);
    download(&cache, names[1], &data[1]); // b: 1 use, last 15
    use_at(0, 20);
    use_at(0, 21); // a: 3 uses, last 21
    assert!(cache.evict().unwrap().is_empty(), "within max_size");

    clock.set(30);
    let before: HashSet<String> = installed_keys(&cache).into_iter().collect();
    download(&cache, names[3], &data[3]);
    let after: HashSet<String> = installed_keys(&cache).into_iter().collect();
    let gone: Vec<String> = before.difference(&after).cloned().collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(after.contains(names[3]), "the new download is spared");
    let stats = cache.stats().unwrap();
    assert_eq!(stats.downloaded_bytes, 3 * s as u64);
    assert_eq!(
        (stats.evicted_by_size, stats.evicted_by_ttl),
        (1, 0),
        "the eviction is counted"
    );
    let victim = names.iter().position(|n| *n == gone[0]).unwrap();
    let file = tmp.path().join("downloaded").join(sha(victim).to_hex());
    assert!(!file.exists(), "victim file deleted");
    gone[0].clone()
}

#[test]
fn lru_evicts_the_least_recently_used() {
    assert_eq!(policy_victim(EvictionPolicy::Lru), "p/c@1.0.0");
}

#[test]
fn lfu_evicts_the_least_frequently_used() {
    assert_eq!(policy_victim(EvictionPolicy::Lfu), "p/b@1.0.0");
}

#[test]
fn fifo_evicts_the_oldest_download() {
    assert_eq!(policy_victim(EvictionPolicy::Fifo), "p/a@1.0.0");
}

#[test]
fn evict_reports_size_victims() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(100);
    let cache = open_at(tmp.path(), opts(1000, EvictionPolicy::Lru, None), &clock);
    let a = download(&cache, "p/a@1.0.0", &content(800, 1));
    clock.set(200);
    // b alone fits; a + b do not: publish spares b and evicts a.
    let _b = download(&cache, "p/b@1.0.0", &content(900, 2));
    assert_eq!(installed_keys(&cache), vec!["p/b@1.0.0"]);
    assert!(!a.path.exists());
    // The publish already evicted; evict() now has nothing to do.
    assert!(cache.evict().unwrap().is_empty());
}

#[test]
fn ttl_evicts_unused_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(0);
    let ttl = Some(Duration::from_millis(100));
    let cache = open_at(tmp.path(), opts(1 << 30, EvictionPolicy::Lru, ttl), &clock);
    let a = download(&cache, "p/a@1.0.0", &content(10, 1));
    clock.set(50);
    let b = download(&cache, "p/b@1.0.0", &content(10, 2));
    clock.set(100);
    assert!(cache.evict().unwrap().is_empty(), "exactly ttl old is kept");
    clock.set(120);
    let evicted = cache.evict().unwrap();
    assert_eq!(
        evicted,
        vec![EvictedEntry {
            plugin: pref("p/a@1.0.0"),
            sha256: a.sha256,
            size: 10,
            reason: EvictReason::Ttl
        }]
    );
    assert!(!a.path.exists());
    assert!(b.path.exists());

    // A pinned entry outlives its TTL; unpinned, it goes.
    let pin = cache.pin(&pref("p/b@1.0.0"));
    clock.set(10_000);
    assert!(cache.evict().unwrap().is_empty());
    assert!(b.path.exists());
    drop(pin);
    assert_eq!(keys(&cache.evict().unwrap()), vec!["p/b@1.0.0"]);
    assert!(!b.path.exists());
}

#[test]
fn pinned_entries_survive_size_eviction() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(100);
    let cache = open_at(tmp.path(), opts(1000, EvictionPolicy::Lru, None), &clock);
    let a_ref = pref("p/a@1.0.0");
    let pin_a = cache.pin(&a_ref);
    let pin_a2 = cache.pin(&a_ref);
    let a = download(&cache, "p/a@1.0.0", &content(800, 1));
    clock.set(200);
    let b = download(&cache, "p/b@1.0.0", &content(900, 2));
    // a is pinned and b was just published: the cache stays above max_size.
    assert_eq!(installed_keys(&cache), vec!["p/a@1.0.0", "p/b@1.0.0"]);
    assert_eq!(cache.stats().unwrap().downloaded_bytes, 1700);
    // A plain evict removes the unpinned b although a is older.
    assert_eq!(keys(&cache.evict().unwrap()), vec!["p/b@1.0.0"]);
    assert!(a.path.exists() && !b.path.exists());
    // One of two pins dropped: a is still pinned.
    drop(pin_a);
    clock.set(300);
    let pin_c = cache.pin(&pref("p/c@1.0.0"));
    let c = download(&cache, "p/c@1.0.0", &content(900, 3));
    assert!(cache.evict().unwrap().is_empty(), "a and c are pinned");
    assert!(a.path.exists() && c.path.exists());
    // Last pin of a dropped: a goes, c is pinned.
    drop(pin_a2);
    let evicted = cache.evict().unwrap();
    assert_eq!(
        evicted,
        vec![EvictedEntry {
            plugin: a_ref,
            sha256: a.sha256,
            size: 800,
            reason: EvictReason::Size
        }]
    );
    assert!(!a.path.exists() && c.path.exists());
    drop(pin_c);
}

#[test]
fn shared_content_is_kept_until_its_last_entry_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(0);
    let ttl = Some(Duration::from_millis(100));
    let cache = open_at(tmp.path(), opts(1 << 30, EvictionPolicy::Lru, ttl), &clock);
    let data = content(3000, 7);
    let v1 = download(&cache, "p/x@1.0.0", &data);
    clock.set(80);
    // Version 2 has the same bytes: found by digest, recorded, no download.
    let v2 = cache
        .get(&pref("p/x@2.0.0"), &v1.sha256)
        .unwrap()
        .expect("shared content is a hit");
    assert_eq!(v2.path, v1.path);
    assert_eq!(installed_keys(&cache), vec!["p/x@1.0.0", "p/x@2.0.0"]);
    assert_eq!(
        cache.stats().unwrap().downloaded_bytes,
        3000,
        "counted once"
    );

    clock.set(150); // v1 expired, v2 not
    assert_eq!(keys(&cache.evict().unwrap()), vec!["p/x@1.0.0"]);
    assert!(v1.path.exists(), "v2 still references the content");
    assert!(cache.get(&pref("p/x@2.0.0"), &v1.sha256).unwrap().is_some());

    clock.set(1_000);
    assert_eq!(keys(&cache.evict().unwrap()), vec!["p/x@2.0.0"]);
    assert!(!v1.path.exists());
    assert_eq!(
        cache.stats().unwrap(),
        CacheStats {
            evicted_by_ttl: 2,
            ..CacheStats::default()
        }
    );
}

#[test]
fn publishing_known_content_under_a_new_version_keeps_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let data = content(2000, 9);
    let a = download(&cache, "p/x@1.0.0", &data);
    let b = download(&cache, "p/x@1.1.0", &data);
    assert_eq!(a.path, b.path);
    assert!(!cache.partial_path(&a.sha256).exists());
    assert_eq!(
        cache.stats().unwrap(),
        CacheStats {
            downloaded_bytes: 2000,
            entries: 2,
            evicted_by_size: 0,
            evicted_by_ttl: 0,
        }
    );
}

#[test]
fn newest_other_version_picks_the_highest_semver() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let id = PluginId::parse("p/x").unwrap();
    let v = |s: &str| semver::Version::parse(s).unwrap();
    assert!(
        cache
            .newest_other_version(&id, &v("1.0.0"))
            .unwrap()
            .is_none()
    );
    download(&cache, "p/x@1.0.0", &content(10, 1));
    download(&cache, "p/x@1.10.0", &content(10, 2));
    let rc = download(&cache, "p/x@2.0.0-rc.1", &content(10, 3));
    download(&cache, "p/x@1.9.0", &content(10, 4));
    download(&cache, "p/other@9.0.0", &content(10, 5));
    let got = |not: &str| {
        cache
            .newest_other_version(&id, &v(not))
            .unwrap()
            .map(|p| p.plugin.version.to_string())
    };
    assert_eq!(got("3.0.0").as_deref(), Some("2.0.0-rc.1"));
    assert_eq!(got("2.0.0-rc.1").as_deref(), Some("1.10.0"));
    // A version whose file is gone does not count.
    fs::remove_file(&rc.path).unwrap();
    assert_eq!(got("3.0.0").as_deref(), Some("1.10.0"));
}

#[test]
fn progress_save_load_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let sha = ContentId::of_bytes(b"some content");
    assert!(cache.load_progress(&sha).unwrap().is_empty());
    cache.save_progress(&sha, &[7, 1, 3, 3, u32::MAX]).unwrap();
    assert_eq!(cache.load_progress(&sha).unwrap(), vec![1, 3, 7, u32::MAX]);
    cache.save_progress(&sha, &[2]).unwrap();
    assert_eq!(cache.load_progress(&sha).unwrap(), vec![2], "replaced");
    let part = cache.partial_path(&sha);
    assert_eq!(
        part,
        tmp.path()
            .join("temp")
            .join(format!("{}.part", sha.to_hex()))
    );
    fs::write(&part, b"partial").unwrap();
    cache.clear_progress(&sha).unwrap();
    assert!(cache.load_progress(&sha).unwrap().is_empty());
    assert!(!part.exists());
    cache.clear_progress(&sha).unwrap(); // idempotent
}

#[test]
fn reopen_reconciles_crash_states() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let kept = content(4000, 1);
    let lost = content(4000, 2);
    let unindexed = content(1500, 3);
    let (kept_sha, lost_sha, unindexed_sha);
    {
        let cache = PluginCache::open(root, roomy()).unwrap();
        kept_sha = download(&cache, "p/kept@1.0.0", &kept).sha256;
        lost_sha = download(&cache, "p/lost@1.0.0", &lost).sha256;
        unindexed_sha = ContentId::of_bytes(&unindexed);
        // Partials: one with a progress record, one without.
        let resumable = ContentId::of_bytes(b"resumable");
        fs::write(cache.partial_path(&resumable), b"half").unwrap();
        cache.save_progress(&resumable, &[0]).unwrap();
        // A progress record whose partial is gone.
        cache
            .save_progress(&ContentId::of_bytes(b"gone"), &[0, 1])
            .unwrap();
    }
    let downloaded = root.join("downloaded");
    // Crashed between rename and index commit: a valid file with no entry.
    fs::write(downloaded.join(unindexed_sha.to_hex()), &unindexed).unwrap();
    // A file whose bytes do not match its name, and stray files.
    let liar = ContentId::of_bytes(b"expected");
    fs::write(downloaded.join(liar.to_hex()), b"something else").unwrap();
    fs::write(downloaded.join("notes.txt"), b"stray").unwrap();
    fs::write(downloaded.join(kept_sha.to_hex().to_uppercase()), &kept).unwrap();
    fs::create_dir(downloaded.join("subdir")).unwrap();
    // An entry whose file was deleted.
    fs::remove_file(downloaded.join(lost_sha.to_hex())).unwrap();
    // Partial download without a progress record, and stray temp files.
    let unrecorded = ContentId::of_bytes(b"unrecorded");
    fs::write(
        root.join("temp")
            .join(format!("{}.part", unrecorded.to_hex())),
        b"x",
    )
    .unwrap();
    fs::write(root.join("temp").join("junk"), b"x").unwrap();

    let cache = PluginCache::open(root, roomy()).unwrap();
    let mut names: Vec<String> = fs::read_dir(&downloaded)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![kept_sha.to_hex(), unindexed_sha.to_hex()];
    expected.sort();
    assert_eq!(names, expected, "corrupt and stray files removed");
    assert!(
        entry(&cache, "p/lost@1.0.0").is_none(),
        "entry without file dropped"
    );
    assert_eq!(installed_keys(&cache), vec!["p/kept@1.0.0"]);
    assert!(
        cache
            .get(&pref("p/kept@1.0.0"), &kept_sha)
            .unwrap()
            .is_some()
    );
    assert!(
        cache
            .get(&pref("p/lost@1.0.0"), &lost_sha)
            .unwrap()
            .is_none()
    );
    // The unindexed file is found by its digest and indexed.
    let found = cache
        .get(&pref("p/new@1.0.0"), &unindexed_sha)
        .unwrap()
        .unwrap();
    assert_eq!(found.size, 1500);
    assert!(entry(&cache, "p/new@1.0.0").is_some());
    // temp/: only the recorded partial survives, and only live records stay.
    let resumable = ContentId::of_bytes(b"resumable");
    let temp: Vec<String> = fs::read_dir(root.join("temp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(temp, vec![format!("{}.part", resumable.to_hex())]);
    assert_eq!(cache.load_progress(&resumable).unwrap(), vec![0]);
    assert!(
        cache
            .load_progress(&ContentId::of_bytes(b"gone"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn garbage_index_is_moved_aside_and_content_found_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = content(6000, 4);
    let sha;
    {
        let cache = PluginCache::open(root, roomy()).unwrap();
        sha = download(&cache, "p/a@1.0.0", &data).sha256;
    }
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("index.redb"), &garbage).unwrap();

    let clock = TestClock::new(42);
    let cache = open_at(root, roomy(), &clock);
    let aside = root.join("index.redb.corrupt-42");
    assert_eq!(
        fs::read(&aside).unwrap(),
        garbage,
        "damaged index kept for inspection"
    );
    assert!(cache.installed().unwrap().is_empty(), "fresh index");
    let hit = cache.get(&pref("p/a@1.0.0"), &sha).unwrap().unwrap();
    assert_eq!(fs::read(hit.path).unwrap(), data);
    assert_eq!(installed_keys(&cache), vec!["p/a@1.0.0"]);
}

#[test]
fn truncated_index_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    {
        let cache = PluginCache::open(root, roomy()).unwrap();
        download(&cache, "p/a@1.0.0", &content(100, 1));
    }
    let index = root.join("index.redb");
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..bytes.len() / 3]).unwrap();
    let cache = PluginCache::open(root, roomy()).unwrap();
    let moved = fs::read_dir(root)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("index.redb.corrupt-")
        })
        .count();
    assert_eq!(moved, 1);
    assert!(
        cache
            .get(&pref("p/a@1.0.0"), &ContentId::of_bytes(&content(100, 1)))
            .unwrap()
            .is_some()
    );
}

#[test]
fn unindexed_content_is_evicted_under_pressure() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let orphan = content(900, 5);
    fs::create_dir_all(root.join("downloaded")).unwrap();
    fs::write(
        root.join("downloaded")
            .join(ContentId::of_bytes(&orphan).to_hex()),
        &orphan,
    )
    .unwrap();
    let clock = TestClock::new(system_now_ms());
    let cache = open_at(root, opts(1000, EvictionPolicy::Lru, None), &clock);
    assert_eq!(cache.stats().unwrap().downloaded_bytes, 900);
    let b = download(&cache, "p/b@1.0.0", &content(500, 6));
    // The orphan is not reported (no plugin names it) but its bytes are freed.
    assert_eq!(cache.stats().unwrap().downloaded_bytes, 500);
    assert!(b.path.exists());
}

#[test]
fn disk_full_names_the_space_needed() {
    let e = CacheError::from_io(
        Path::new("/c/temp/x.part"),
        Some(4096),
        io::Error::from_raw_os_error(28),
    );
    assert!(
        matches!(
            e,
            CacheError::DiskFull {
                needed: Some(4096),
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("4096 bytes needed") && msg.contains("/c/temp/x.part"),
        "{msg}"
    );
    let quota = CacheError::from_io(Path::new("/c"), None, io::Error::from_raw_os_error(122));
    assert!(matches!(quota, CacheError::DiskFull { needed: None, .. }));
    assert!(!quota.to_string().contains("needed"));
    let other = CacheError::from_io(Path::new("/c"), None, io::Error::from_raw_os_error(13));
    assert!(matches!(other, CacheError::Io { .. }));
    assert!(std::error::Error::source(&other).is_some());
    assert!(other.to_string().contains("at /c: "), "{other}");
    // Unnamed paths (the fetcher's `?` on std I/O) are classified the same way.
    let full = CacheError::from(io::Error::from_raw_os_error(28));
    assert!(matches!(full, CacheError::DiskFull { .. }), "{full:?}");
    assert!(!full.to_string().contains(" at "), "{full}");
}

#[test]
fn space_is_checked_before_a_download_starts() {
    let e = require_space(Path::new("/c/temp/x.part"), 4096, Some(1000)).unwrap_err();
    assert!(
        matches!(
            e,
            CacheError::DiskFull {
                needed: Some(4096),
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("4096 bytes needed") && msg.contains("only 1000 bytes are free"),
        "{msg}"
    );
    require_space(Path::new("/c"), 4096, Some(4096)).unwrap();
    // A file system that reports no capacity is not second-guessed.
    require_space(Path::new("/c"), u64::MAX, None).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    assert!(free_space(tmp.path()).unwrap().is_some_and(|f| f > 0));
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let data = content(10_000, 3);
    let m = Manifest::from_reader(&data[..], 4096).unwrap();
    cache.check_space(&m).unwrap();
    assert!(
        !cache.partial_path(&m.content_id()).exists(),
        "the check creates nothing"
    );
}

#[test]
fn concurrent_handles_share_one_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PluginCache::open(tmp.path(), roomy()).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let data = content(3000 + usize::from(i), i);
                let plugin = pref(&format!("p/t{i}@1.0.0"));
                let m = stage(&cache, &data);
                let _pin = cache.pin(&plugin);
                cache.publish(&plugin, &m).unwrap();
                for _ in 0..5 {
                    assert!(cache.get(&plugin, &m.content_id()).unwrap().is_some());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(cache.installed().unwrap().len(), 8);
    for p in cache.installed().unwrap() {
        assert_eq!(entry(&cache, &p.plugin.key()).unwrap().use_count, 6);
    }
}

#[test]
fn index_damaged_anywhere_still_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = content(700, 8);
    let sha = ContentId::of_bytes(&data);
    {
        let cache = PluginCache::open(root, roomy()).unwrap();
        download(&cache, "p/a@1.0.0", &data);
        cache
            .save_progress(&ContentId::of_bytes(b"p"), &[1, 2])
            .unwrap();
    }
    let index = root.join("index.redb");
    let pristine = fs::read(&index).unwrap();
    let step = (pristine.len() / 64).max(1);
    for offset in (0..pristine.len()).step_by(step) {
        let mut damaged = pristine.clone();
        damaged[offset] ^= 0x5a;
        fs::write(&index, &damaged).unwrap();
        let cache =
            PluginCache::open(root, roomy()).unwrap_or_else(|e| panic!("flip at {offset}: {e:?}"));
        // Either the damage was harmless or the index was rebuilt: the content is found.
        assert!(
            cache.get(&pref("p/a@1.0.0"), &sha).unwrap().is_some(),
            "flip at {offset}"
        );
        drop(cache);
        for e in fs::read_dir(root).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains(".corrupt-") {
                fs::remove_file(p).unwrap();
            }
        }
    }
}

/// What a job running as the agent's user can do to the cache: make the file writable
/// again and rewrite it in place, same size, with its mtime set back.
#[cfg(unix)]
fn rewrite_in_place(path: &Path, data: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let before = fs::metadata(path).unwrap().modified().unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(path, data).unwrap();
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(before)
        .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o555)).unwrap();
}

#[cfg(unix)]
#[test]
fn a_cached_plugin_rewritten_on_disk_is_never_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), roomy(), &clock);
    let good = content(10_000, 1);
    let got = download(&cache, "team/a@1.0.0", &good);
    let sha = got.sha256;
    let p = pref("team/a@1.0.0");
    // Unchanged: a hit.
    assert!(cache.get(&p, &sha).unwrap().is_some());
    // Rewritten with other bytes of the same size, mtime restored: not a hit, and the
    // file is gone so the caller fetches and verifies it again.
    let mut evil = good.clone();
    evil[0] ^= 0xff;
    rewrite_in_place(&got.path, &evil);
    assert!(cache.get(&p, &sha).unwrap().is_none());
    assert!(!got.path.exists(), "tampered content left in the cache");
    assert!(entry(&cache, "team/a@1.0.0").is_none());
    // Replaced by another file (a new inode) holding the *right* bytes: hashed again,
    // found good, served.
    let again = download(&cache, "team/a@1.0.0", &good);
    let staged = tmp.path().join("copy");
    fs::write(&staged, &good).unwrap();
    fs::rename(&staged, &again.path).unwrap();
    assert!(cache.get(&p, &sha).unwrap().is_some());
    // A fallback to another version is checked the same way.
    rewrite_in_place(&again.path, &evil);
    let newest = cache
        .newest_other_version(&p.id, &"2.0.0".parse().unwrap())
        .unwrap();
    assert!(newest.is_none(), "a tampered fallback was offered");
}

#[cfg(unix)]
#[test]
fn a_file_planted_under_a_content_name_is_not_indexed() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), roomy(), &clock);
    let good = content(5_000, 2);
    let m = Manifest::from_reader(&good[..], CS).unwrap();
    // A job writes bytes of its own under the name of content not yet cached.
    let planted = tmp.path().join("downloaded").join(m.content_id().to_hex());
    fs::write(&planted, content(5_000, 3)).unwrap();
    let p = pref("team/b@1.0.0");
    assert!(cache.get(&p, &m.content_id()).unwrap().is_none());
    assert!(!planted.exists(), "the planted file was kept");
    // The same bytes as the content (a copy made by hand) are fine: verified, indexed.
    fs::write(&planted, &good).unwrap();
    assert!(cache.get(&p, &m.content_id()).unwrap().is_some());
}

#[cfg(unix)]
#[test]
fn a_rewritten_builtin_is_not_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(tmp.path(), roomy(), &clock);
    let file = tmp.path().join("builtin").join("tool.sh");
    fs::write(&file, b"#!/bin/sh\necho good\n").unwrap();
    let p = pref("tool/x@1.0.0");
    let b = cache.register_builtin(&p, "tool.sh").unwrap();
    assert!(cache.get(&p, &b.sha256).unwrap().is_some());
    rewrite_in_place(&file, b"#!/bin/sh\necho evil\n");
    assert!(cache.get(&p, &b.sha256).unwrap().is_none());
}

/// Chunks of held content are found by BLAKE3 across versions (fixed chunks at the
/// same offsets here), copied into a partial and verified; the lookup table follows
/// publishes; an evicted content's manifest is dropped and gives nothing.
#[test]
fn held_chunks_are_reused_and_evicted_content_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(1_000);
    let cache = open_at(
        dir.path(),
        opts(12 * 1024, EvictionPolicy::Lru, None),
        &clock,
    );
    let old = content(8 * CS as usize, 1);
    download(&cache, "reuse/a@1.0.0", &old);
    // The new version: chunks 0..6 as in the old one, then two new chunks.
    let mut new = old[..6 * CS as usize].to_vec();
    new.extend(content(2 * CS as usize, 9));
    let m = Manifest::from_reader(&new[..], CS).unwrap();
    let partial = cache.partial_path(&m.content_id());
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .unwrap();
    file.set_len(m.size()).unwrap();
    let mut have = vec![false; m.chunk_count() as usize];
    have[1] = true; // resumed: not copied again
    let reused = cache.reuse_held_chunks(&m, &file, &mut have).unwrap();
    assert_eq!(
        reused,
        Reused {
            chunks: 5,
            bytes: 5 * u64::from(CS),
            sources: 1
        }
    );
    assert_eq!(have, [true, true, true, true, true, true, false, false]);
    let written = fs::read(&partial).unwrap();
    assert_eq!(written[..CS as usize], new[..CS as usize]);
    assert_eq!(
        written[2 * CS as usize..6 * CS as usize],
        new[2 * CS as usize..6 * CS as usize]
    );
    assert!(
        written[CS as usize..2 * CS as usize]
            .iter()
            .all(|b| *b == 0)
    );

    // A later publish is indexed; publishing past max_size evicts the old content,
    // whose manifest row is then dropped and whose chunks are no longer offered.
    let other = content(8 * CS as usize, 2);
    download(&cache, "reuse/b@1.0.0", &other);
    assert!(installed_keys(&cache) == ["reuse/b@1.0.0"]);
    let mut fresh = vec![false; m.chunk_count() as usize];
    let reused = cache.reuse_held_chunks(&m, &file, &mut fresh).unwrap();
    assert_eq!(reused.chunks, 0);
    let rows: Vec<ContentId> = cache
        .inner
        .index
        .manifests()
        .unwrap()
        .into_iter()
        .map(|(sha, _)| sha)
        .collect();
    assert_eq!(rows, [ContentId::of_bytes(&other)]);
    let m2 = Manifest::from_reader(&other[..], CS).unwrap();
    let part2 = fs::File::create(dir.path().join("scratch")).unwrap();
    part2.set_len(m2.size()).unwrap();
    let mut have2 = vec![false; m2.chunk_count() as usize];
    // Every chunk of `other` is held, but in `other` itself: never a source for itself.
    let reused = cache.reuse_held_chunks(&m2, &part2, &mut have2).unwrap();
    assert_eq!(reused.chunks, 0, "a content is never copied from itself");
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// `None` where mounting is not allowed (not root): the caller says so and skips.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Watermarks of the file system: a 16 MiB tmpfs, eviction over 25 % (4 MiB) down to
/// 12.5 % (2 MiB), counting only the cache's own downloads (a 6 MiB file of someone
/// else's on the same file system changes nothing); a pinned plugin is never evicted.
#[test]
fn filesystem_watermarks_evict_down_to_the_low_mark_on_a_small_tmpfs() {
    let Some(fs) = Tmpfs::mount("16m") else {
        eprintln!("cannot mount a tmpfs (needs root): skipping");
        return;
    };
    let clock = TestClock::new(1_000);
    let mut o = opts(1 << 30, EvictionPolicy::Lru, None);
    o.watermarks = Watermarks {
        high: 0.25,
        low: 0.125,
        of: WatermarkBase::Filesystem,
    };
    fs::write(fs.0.path().join("someone-else"), vec![7u8; 6 << 20]).unwrap();
    let cache = open_at(&fs.0.path().join("cache"), o, &clock);
    let mib = |seed: u8| content(1 << 20, seed);
    let _pin = cache.pin(&pref("wm/p0@1.0.0"));
    for i in 0..4u8 {
        clock.set(2_000 + u64::from(i));
        download(&cache, &format!("wm/p{i}@1.0.0"), &mib(i));
    }
    // 4 MiB: at the high mark, not over it.
    assert_eq!(installed_keys(&cache).len(), 4);
    clock.set(3_000);
    download(&cache, "wm/p4@1.0.0", &mib(4));
    // 5 MiB > 4 MiB: down to 2 MiB — the pinned p0 and the one just published stay;
    // p1, p2 and p3 (least recently used) go.
    assert_eq!(installed_keys(&cache), ["wm/p0@1.0.0", "wm/p4@1.0.0"]);
    assert_eq!(cache.stats().unwrap().downloaded_bytes, 2 << 20);
    assert_eq!(cache.stats().unwrap().evicted_by_size, 3);
}
