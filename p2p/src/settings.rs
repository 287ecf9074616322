//! Typed configuration from TOML with `ARCADE_…` environment overrides, shared by the
//! coordinator and the agent (one loader for both).
//!
//! - Every config struct implements `Default`, so no file (or a partial file) is valid.
//! - Every leaf key of the defaults can be overridden by an environment variable named
//!   `<PREFIX>_<PATH>` in upper case with `.` and `-` as `_`: `plugin.max_plugin_size`
//!   → `ARCADE_PLUGIN_MAX_PLUGIN_SIZE`. The value is read as a TOML value when it parses
//!   as one (numbers, booleans, arrays) and as a string otherwise.
//! - Errors name the offending key.
//!
//! Sizes ([`ByteSize`]) accept an integer — mebibytes, as in the original design's
//! `max_plugin_size = 100` — or a string with a unit (`"512KiB"`, `"1GiB"`, `"100MB"`,
//! `"4096B"`). Durations ([`Seconds`]) accept an integer of seconds or a string with a
//! unit (`"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configuration that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key has a value of the wrong type, or is unknown.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl SettingsError {
    /// A validation failure of one key.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Creates the directory `path` (and its parents) and makes it private to its owner
/// (mode 0700), whatever mode it had: data directories hold tokens, keys and the
/// metadata of what may run.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    restrict(path, 0o700)
}

/// Sets `path`'s permission bits to `mode` (no-op off Unix).
pub fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Reads a secret (a token) from the file `path` named by config key `key`: its text
/// without surrounding whitespace. A missing, unreadable or empty file is an error naming
/// the key; a file other users may read is accepted with a warning. Files keep secrets
/// out of command lines (`/proc/PID/cmdline` is readable by every local user).
pub fn read_secret(key: &str, path: &Path) -> Result<String, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(SettingsError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), key, "secret file is readable by other users; chmod 600 it");
            }
        }
    }
    Ok(secret)
}

/// Loads `T` from an optional TOML file, then applies environment overrides read
/// through `env` (pass `|k| std::env::var(k).ok()` in binaries).
pub fn load<T>(
    path: Option<&Path>,
    env_prefix: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<T, SettingsError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let text = match path {
        Some(path) => std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?,
        None => String::new(),
    };
    load_text(&text, path.unwrap_or(Path::new("")), env_prefix, env)
}

/// [`load`] with the file's text in memory (`path` only names it in errors); an empty
/// text is the same as no file.
pub fn load_text<T>(
    text: &str,
    path: &Path,
    env_prefix: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<T, SettingsError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut doc = text
        .parse::<toml::Table>()
        .map_err(|e| SettingsError::Parse {
            path: path.to_owned(),
            message: toml_error_line(&e, text),
        })?;
    let defaults = toml::Table::try_from(T::default()).map_err(|e| SettingsError::Key {
        key: "<defaults>".into(),
        message: e.to_string(),
    })?;
    let mut leaves = Vec::new();
    collect_leaves(&defaults, &mut Vec::new(), &mut leaves);
    for path in leaves {
        let var = env_name(env_prefix, &path);
        if let Some(raw) = env(&var) {
            set_path(&mut doc, &path, parse_env_value(&raw)).map_err(|message| {
                SettingsError::Key {
                    key: path.join("."),
                    message: format!("from {var}: {message}"),
                }
            })?;
        }
    }
    serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
        let key = e.path().to_string();
        SettingsError::Key {
            key,
            message: toml_error_line(&e.into_inner(), ""),
        }
    })
}

/// A TOML error as one line, `line L, column C: message` when it has a position in
/// `text`: the parser's own rendering spans several lines (a source excerpt and a
/// caret), which does not fit a one-line error of a binary.
fn toml_error_line(e: &toml::de::Error, text: &str) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// The environment variable that overrides a key path.
pub fn env_name(prefix: &str, path: &[String]) -> String {
    let mut name = prefix.to_owned();
    for p in path {
        name.push('_');
        name.push_str(&p.replace(['.', '-'], "_").to_ascii_uppercase());
    }
    name
}

fn collect_leaves(table: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(t) => collect_leaves(t, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(doc: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key path")?;
    let mut table = doc;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` in the config file is not a table"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// A size in bytes; see the module documentation for the accepted forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` kibibytes.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"512KiB"`, `"1GiB"`, `"100MB"`, `"4096B"`, `"4096"` (bytes).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"512KiB\", \"100MiB\" or \"1GiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "KB" => 1000,
            "M" | "MiB" => 1 << 20,
            "MB" => 1_000_000,
            "G" | "GiB" => 1 << 30,
            "GB" => 1_000_000_000,
            "T" | "TiB" => 1 << 40,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if b != 0 && b % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_text(
            d,
            "a size: an integer of MiB or a string like \"512KiB\" or \"1GiB\"",
            |n| n.checked_mul(1 << 20).map(ByteSize),
            ByteSize::parse,
        )
    }
}

/// An integer (in `int_unit`) or a string parsed by `parse`: the shape every size and
/// duration key accepts.
fn int_or_text<'de, D, T>(
    d: D,
    expected: &str,
    from_int: impl FnOnce(u64) -> Option<T>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Str(String),
    }
    match Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom(format!("expected {expected}")))?
    {
        Raw::Int(n) if n >= 0 => {
            from_int(n as u64).ok_or_else(|| serde::de::Error::custom("value is too large"))
        }
        Raw::Int(n) => Err(serde::de::Error::custom(format!(
            "must not be negative, got {n}"
        ))),
        Raw::Str(s) => parse(&s).map_err(serde::de::Error::custom),
    }
}

/// Deserializes a duration whose integer form counts `secs_per_unit` seconds (e.g.
/// 3600 for keys that the original design gave in hours).
pub fn duration_with_int_unit<'de, D: Deserializer<'de>>(
    d: D,
    secs_per_unit: u64,
) -> Result<Seconds, D::Error> {
    int_or_text(
        d,
        "a duration: an integer or a string like \"30s\", \"5m\" or \"2h\"",
        |n| n.checked_mul(secs_per_unit).map(Seconds::secs),
        Seconds::parse,
    )
}

/// A duration; see the module documentation for the accepted forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Seconds(pub Duration);

impl Seconds {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Self {
        Self(Duration::from_secs(n))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"` or `"30"` (seconds).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like \"30s\", \"5m\" or \"2h\""))?;
        let d = match unit.trim() {
            "ms" => Some(Duration::from_millis(n)),
            "" | "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            other => {
                return Err(format!(
                    "unknown duration unit {other:?}: use ms, s, m, h or d"
                ));
            }
        };
        d.map(Self).ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.as_secs() == 0 && !d.is_zero() {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        for (div, unit) in [(86_400, "d"), (3600, "h"), (60, "m")] {
            if s != 0 && s % div == 0 {
                return write!(f, "{}{unit}", s / div);
            }
        }
        write!(f, "{s}s")
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration_with_int_unit(d, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        name: String,
        size: ByteSize,
        ttl: Seconds,
        inner: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        enabled: bool,
        max_items: u32,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self {
                name: "x".into(),
                size: ByteSize::mib(1),
                ttl: Seconds::secs(60),
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                enabled: true,
                max_items: 3,
            }
        }
    }

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Demo, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load(Some(&path), "ARCADE", |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_file_and_env_layer() {
        assert_eq!(load_str("", &[]).unwrap(), Demo::default());
        let d = load_str(
            "size = 100\nttl = \"5m\"\n[inner]\nmax_items = 9\n",
            &[
                ("ARCADE_INNER_ENABLED", "false"),
                ("ARCADE_NAME", "hello world"),
            ],
        )
        .unwrap();
        assert_eq!(d.size, ByteSize::mib(100));
        assert_eq!(d.ttl, Seconds::secs(300));
        assert_eq!(
            d.inner,
            Inner {
                enabled: false,
                max_items: 9
            }
        );
        assert_eq!(d.name, "hello world");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_str("[inner]\nmax_items = \"many\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("inner.max_items"), "{e}");
        let e = load_str("", &[("ARCADE_SIZE", "12 parsecs")]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = load_str("typo = 1\n", &[]).unwrap_err();
        assert!(e.to_string().contains("typo"), "{e}");
        let e = load_str("ttl = -5\n", &[]).unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
        assert!(matches!(
            load_str("[[[", &[]),
            Err(SettingsError::Parse { .. })
        ));
    }

    #[test]
    fn errors_are_one_line() {
        let e = load_str("name = \"x\"\n[[[\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("line 2, column"), "{e}");
        let e = load_str("[inner]\nmax_items = -1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("`inner.max_items`"), "{e}");
        let e = load_str("", &[("ARCADE_INNER_ENABLED", "[1, 2]")])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("inner.enabled"), "{e}");
    }

    #[test]
    fn sizes_and_durations_roundtrip() {
        for s in ["1MiB", "512KiB", "3GiB", "1000B", "7TiB"] {
            assert_eq!(ByteSize::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(ByteSize::parse("100MB").unwrap().bytes(), 100_000_000);
        assert!(ByteSize::parse("99999999999999TiB").is_err());
        assert!(ByteSize::parse("1 XB").is_err());
        for s in ["500ms", "30s", "5m", "2h", "1d"] {
            assert_eq!(Seconds::parse(s).unwrap().to_string(), s);
        }
        assert!(Seconds::parse("5 fortnights").is_err());
    }

    #[test]
    fn text_loads_like_the_file() {
        let text = "size = \"2MiB\"\n[inner]\nenabled = false\n";
        let env = |k: &str| (k == "ARCADE_TTL").then(|| "2h".to_owned());
        let from_text: Demo = load_text(text, Path::new("mem.toml"), "ARCADE", env).unwrap();
        assert_eq!(from_text, load_str(text, &[("ARCADE_TTL", "2h")]).unwrap());
        let e = load_text::<Demo>("[[[", Path::new("mem.toml"), "ARCADE", |_| None).unwrap_err();
        assert!(e.to_string().contains("mem.toml"), "{e}");
    }
}
