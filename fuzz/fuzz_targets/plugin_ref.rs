//! Plugin id, version and reference parsers (`arcade_p2p::plugin_ref`) on arbitrary
//! UTF-8 text (anything else is skipped).
//!
//! Whatever is accepted must keep the module's promises: an id is non-empty, at most
//! `MAX_PLUGIN_ID_LEN` bytes of `[a-z0-9._/-]` (so no NUL, `\`, upper case or non-ASCII),
//! `/`-separated segments that are non-empty, not `.`/`..` and start with `[a-z0-9]`,
//! so it is a safe relative path; a version is semver of at most `MAX_VERSION_LEN`
//! bytes; and every `Display` form parses back to an equal value.
//!
//! The text goes to `PluginId::parse`, `parse_version`, `PluginRef::from_str`,
//! `VersionSelector::parse` and `PluginSelector::from_str` whole, and to `PluginRef::new`
//! split at its first newline (id, then version). An accepted selector shows as text
//! that parses back to an equal selector (what `arcadectl` sends and the coordinator
//! records), and an exact one matches its version only.
#![no_main]

use std::path::{Component, Path};

use arcade_p2p::plugin_ref::{MAX_PLUGIN_ID_LEN, MAX_VERSION_LEN, parse_version};
use arcade_p2p::{PluginId, PluginRef, PluginSelector, VersionSelector};
use libfuzzer_sys::fuzz_target;

fn check_id(input: &str, id: &PluginId) {
    let s = id.as_str();
    assert_eq!(s, input);
    assert!(!s.is_empty() && s.len() <= MAX_PLUGIN_ID_LEN, "{s:?}");
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b)),
        "{s:?} has a byte outside [a-z0-9._/-]"
    );
    assert!(
        !s.starts_with('/') && !s.ends_with('/') && !s.contains("//"),
        "{s:?}"
    );
    for seg in s.split('/') {
        assert!(seg != "." && seg != "..", "{s:?} has a dot segment");
        let first = seg.as_bytes()[0];
        assert!(
            first.is_ascii_lowercase() || first.is_ascii_digit(),
            "{s:?}"
        );
    }
    let p = Path::new(s);
    assert!(p.is_relative());
    assert!(
        p.components().all(|c| matches!(c, Component::Normal(_))),
        "{s:?} is not a plain relative path"
    );
    assert_eq!(id.first_segment(), s.split('/').next().unwrap());
    assert_eq!(id.to_string(), s);
    assert_eq!(PluginId::parse(&id.to_string()).as_ref(), Ok(id));
}

fn check_version(v: &semver::Version) {
    let shown = v.to_string();
    assert!(
        shown.len() <= MAX_VERSION_LEN,
        "{shown:?} is too long to re-parse"
    );
    assert_eq!(parse_version(&shown).as_ref(), Ok(v), "{shown:?}");
}

fn check_ref(r: &PluginRef) {
    let key = r.key();
    assert_eq!(key, r.to_string());
    assert_eq!(key.matches('@').count(), 1, "{key:?}");
    assert_eq!(key.parse::<PluginRef>().as_ref(), Ok(r), "{key:?}");
    check_id(r.id.as_str(), &r.id);
    check_version(&r.version);
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match PluginId::parse(s) {
        Ok(id) => check_id(s, &id),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match parse_version(s) {
        Ok(v) => check_version(&v),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match s.parse::<PluginRef>() {
        Ok(r) => {
            let (id, version) = s.rsplit_once('@').unwrap();
            assert_eq!(r.id.as_str(), id);
            assert_eq!(Ok(&r.version), parse_version(version).as_ref());
            check_ref(&r);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match VersionSelector::parse(s) {
        Ok(sel) => {
            let shown = sel.to_string();
            assert!(shown.len() <= MAX_VERSION_LEN, "{shown:?}");
            assert_eq!(VersionSelector::parse(&shown).as_ref(), Ok(&sel), "{shown:?}");
            if let VersionSelector::Exact(v) = &sel {
                assert!(sel.is_exact() && sel.matches(v));
                check_version(v);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(p) = s.parse::<PluginSelector>() {
        check_id(p.id.as_str(), &p.id);
        assert_eq!(p.to_string().parse::<PluginSelector>().as_ref(), Ok(&p));
    }
    let (id, version) = s.split_once('\n').unwrap_or((s, ""));
    if let Ok(r) = PluginRef::new(id, version) {
        assert_eq!(r.id.as_str(), id);
        check_ref(&r);
    }
});
