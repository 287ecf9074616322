//! The configuration parsers: the agent's and the coordinator's TOML files through the
//! same path as the binaries (`settings::load_text`, which `settings::load` uses after
//! reading the file, then `validate`), with `ARCADE_…` environment overrides taken
//! from the input (the process environment is never read or changed), and the size
//! and duration parsers (`ByteSize::parse`, `Seconds::parse`) on their own.
//!
//! Input: one selector byte, then UTF-8 text (anything else is skipped).
//! - selector % 4 == 0: agent config; 1: coordinator config. The text is the TOML file;
//!   after the first NUL come environment overrides, `NAME=VALUE` separated by NUL or
//!   newline (e.g. `ARCADE_CACHE_TTL=2h`).
//! - 2: `ByteSize::parse`, 3: `Seconds::parse` of the text. What parses must print
//!   (`Display`) as text that parses back to the same value.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use arcade_agent::config::AgentConfig;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_p2p::labels::MAX_LABELS;
use arcade_p2p::manifest::{MAX_CHUNK_SIZE, MAX_CHUNKS, MIN_CHUNK_SIZE};
use arcade_p2p::settings::{ByteSize, Seconds, load_text};
use arcade_p2p::{PluginRef, settings::SettingsError};
use libfuzzer_sys::fuzz_target;

fn split_env(text: &str) -> (&str, HashMap<String, String>) {
    let Some((toml, env)) = text.split_once('\0') else {
        return (text, HashMap::new());
    };
    let vars = env
        .split(['\0', '\n'])
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (toml, vars)
}

fn shown(e: &SettingsError) {
    // The binaries print a config error as one line.
    let line = e.to_string();
    assert!(!line.contains('\n'), "multi-line config error: {line:?}");
    let _ = format!("{e:?}");
}

/// Loads a config from the input as the binaries do (file text, then `ARCADE_*`
/// overrides from the input); `None` after checking the error.
fn load<T>(text: &str, name: &str) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let (toml, env) = split_env(text);
    load_text(toml, Path::new(name), "ARCADE", |k| env.get(k).cloned())
        .map_err(|e| shown(&e))
        .ok()
}

fn agent(text: &str) {
    let Some(config) = load::<AgentConfig>(text, "agent.toml") else {
        return;
    };
    let v = match config.validate() {
        Ok(v) => v,
        Err(e) => return shown(&e),
    };
    assert!(v.labels.len() <= MAX_LABELS);
    for (r, file) in &v.builtin {
        // What the cache will look up and the file it will open under builtin/.
        assert_eq!(r.to_string().parse::<PluginRef>().as_ref(), Ok(r));
        let p = Path::new(file);
        assert!(!file.is_empty() && p.is_relative());
        assert!(
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "builtin file {file:?} escapes builtin/"
        );
    }
}

fn coordinator(text: &str) {
    let Some(config) = load::<CoordinatorConfig>(text, "coordinator.toml") else {
        return;
    };
    let v = match config.validate() {
        Ok(v) => v,
        Err(e) => return shown(&e),
    };
    let cs = v.chunk_size;
    assert!(cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs));
    assert_eq!(u64::from(cs), v.raw.plugin.chunk_size.bytes());
    let max = v.raw.plugin.max_plugin_size.bytes();
    assert!(max > 0 && max.div_ceil(u64::from(cs)) <= MAX_CHUNKS);
    assert!(v.raw.jobs.heartbeat_interval < v.raw.jobs.lease_ttl);
}

fn size(text: &str) {
    if let Ok(b) = ByteSize::parse(text) {
        let shown = b.to_string();
        assert_eq!(
            ByteSize::parse(&shown),
            Ok(b),
            "{text:?} printed as {shown:?}"
        );
    }
}

fn duration(text: &str) {
    if let Ok(d) = Seconds::parse(text) {
        let shown = d.to_string();
        assert_eq!(
            Seconds::parse(&shown),
            Ok(d),
            "{text:?} printed as {shown:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match selector % 4 {
        0 => agent(text),
        1 => coordinator(text),
        2 => size(text),
        _ => duration(text),
    }
});
